"""A stateful Alipay open-platform gateway for the payment worker's tests.

Every signature is made and checked by Alipay's official Python SDK (alipay-sdk-python,
alipay.aop.api.util.SignatureUtils), not by the code under test:

- our requests: the SDK's get_sign_content (every parameter but `sign`, sorted, k=v&...) and
  verify_with_rsa with the merchant's public key; a request that does not verify is answered
  40002 isv.invalid-signature, unsigned, as Alipay does, and counted;
- its answers: sign_with_rsa2 over the exact text of the *_response object, with a key of
  its own whose public half the worker is given.

It keeps trades by out_trade_no (a number is paid at most once) and answers by agreement:

  agreement_no contains  answer to alipay.trade.pay
  ---------------------  ------------------------------------------------------------
  broke                  40004 ACQ.BUYER_BALANCE_NOT_ENOUGH
  cancelled              40004 ACQ.AGREEMENT_STATUS_NOT_NORMAL
  capped                 40004 ACQ.CYCLE_PAY_SINGLE_FEE_EXCEED above 30.00
  lost                   pays, answers 20000 (unknown); the query tells the truth
  forged                 the first answer is a "10000 success" for a trade never made,
                         signed with another key; later requests are served honestly
  anything else          pays: 10000 with a trade_no

GET /_ledger answers what happened, as JSON. The first line on stdout is
{"port", "merchant_private_key", "alipay_public_key"} (base64 bodies, as Alipay's key
tool hands them out).
"""
import json
import sys
import threading
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from alipay.aop.api.util.SignatureUtils import get_sign_content, sign_with_rsa2, verify_with_rsa
from Crypto.PublicKey import RSA


def body_of(pem: bytes) -> str:
    return "".join(line for line in pem.decode().splitlines() if not line.startswith("-----"))


MERCHANT = RSA.generate(2048)
ALIPAY = RSA.generate(2048)
IMPOSTOR = RSA.generate(2048)
MERCHANT_PUBLIC = body_of(MERCHANT.publickey().export_key())
ALIPAY_PRIVATE = body_of(ALIPAY.export_key(pkcs=1))
IMPOSTOR_PRIVATE = body_of(IMPOSTOR.export_key(pkcs=1))

LOCK = threading.Lock()
LEDGER = {
    "charges": {},  # out_trade_no -> payments made
    "by_agreement": {},  # agreement_no -> payments made
    "requests": {},  # out_trade_no -> alipay.trade.pay requests
    "queries": {},  # out_trade_no -> alipay.trade.query requests
    "bad_signatures": 0,
    "problems": [],  # requests not shaped as Alipay wants
}
TRADES = {}  # out_trade_no -> {"trade_no", "status", "amount"}
FORGED_GIVEN = set()


def signed(method: str, answer: dict, key: str = ALIPAY_PRIVATE) -> bytes:
    part = json.dumps(answer, ensure_ascii=False, separators=(",", ":"))
    sign = sign_with_rsa2(key, part, "utf-8")
    name = method.replace(".", "_") + "_response"
    return ('{"%s":%s,"sign":"%s"}' % (name, part, sign)).encode("utf-8")


def failure(sub_code: str, sub_msg: str) -> dict:
    return {"code": "40004", "msg": "Business Failed", "sub_code": sub_code, "sub_msg": sub_msg}


def problem(text: str) -> None:
    with LOCK:
        LEDGER["problems"].append(text)


def pay(biz: dict) -> tuple:
    """(answer, key it is signed with)."""
    out_trade_no = biz.get("out_trade_no", "")
    agreement = biz.get("agreement_params", {}).get("agreement_no", "")
    amount = biz.get("total_amount", "")
    if biz.get("product_code") != "GENERAL_WITHHOLDING":
        problem("product_code %r" % biz.get("product_code"))
    if not (0 < len(out_trade_no) <= 64 and out_trade_no.replace("_", "").isalnum()):
        problem("out_trade_no %r" % out_trade_no)
    if not isinstance(amount, str) or len(amount.split(".")[-1]) != 2:
        problem("total_amount %r is not yuan with two decimals" % (amount,))
    with LOCK:
        LEDGER["requests"][out_trade_no] = LEDGER["requests"].get(out_trade_no, 0) + 1
        trade = TRADES.get(out_trade_no)
        if trade and trade["status"] == "TRADE_SUCCESS":
            return failure("ACQ.TRADE_HAS_SUCCESS", "交易已被支付"), ALIPAY_PRIVATE
        if "forged" in agreement and out_trade_no not in FORGED_GIVEN:
            FORGED_GIVEN.add(out_trade_no)
            fake = {"code": "10000", "msg": "Success", "trade_no": "forged-" + out_trade_no,
                    "out_trade_no": out_trade_no, "total_amount": amount}
            return fake, IMPOSTOR_PRIVATE
        if "broke" in agreement:
            return failure("ACQ.BUYER_BALANCE_NOT_ENOUGH", "买家余额不足"), ALIPAY_PRIVATE
        if "cancelled" in agreement:
            return failure("ACQ.AGREEMENT_STATUS_NOT_NORMAL", "协议状态非正常"), ALIPAY_PRIVATE
        if "capped" in agreement and float(amount) > 30.00:
            return failure("ACQ.CYCLE_PAY_SINGLE_FEE_EXCEED", "单笔金额超限"), ALIPAY_PRIVATE
        trade_no = "2026%012d" % (len(TRADES) + 1)
        TRADES[out_trade_no] = {"trade_no": trade_no, "status": "TRADE_SUCCESS", "amount": amount}
        LEDGER["charges"][out_trade_no] = LEDGER["charges"].get(out_trade_no, 0) + 1
        LEDGER["by_agreement"][agreement] = LEDGER["by_agreement"].get(agreement, 0) + 1
    if "lost" in agreement:
        return {"code": "20000", "msg": "Service Currently Unavailable",
                "sub_code": "aop.unknow-error", "sub_msg": "系统繁忙"}, ALIPAY_PRIVATE
    return {"code": "10000", "msg": "Success", "trade_no": trade_no,
            "out_trade_no": out_trade_no, "total_amount": amount}, ALIPAY_PRIVATE


def query(biz: dict) -> dict:
    out_trade_no = biz.get("out_trade_no", "")
    with LOCK:
        LEDGER["queries"][out_trade_no] = LEDGER["queries"].get(out_trade_no, 0) + 1
        trade = TRADES.get(out_trade_no)
    if trade is None:
        return failure("ACQ.TRADE_NOT_EXIST", "交易不存在")
    return {"code": "10000", "msg": "Success", "trade_no": trade["trade_no"],
            "out_trade_no": out_trade_no, "trade_status": trade["status"],
            "total_amount": trade["amount"]}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, body: bytes, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json;charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/_ledger":
            with LOCK:
                self.answer(json.dumps(LEDGER).encode())
        else:
            self.answer(b"{}", 404)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        form = self.rfile.read(length).decode("utf-8")
        # The SDK sends the common parameters in the query string and biz_content in the
        # body; Alipay reads both.
        params = dict(parse_qsl(urlsplit(self.path).query, keep_blank_values=True))
        params.update(dict(parse_qsl(form, keep_blank_values=True)))
        method = params.get("method", "")
        sign = params.pop("sign", "")
        content = get_sign_content({k: v for k, v in params.items() if v != ""})
        try:
            verified = params.get("sign_type") == "RSA2" and verify_with_rsa(
                MERCHANT_PUBLIC, content.encode("utf-8"), sign)
        except Exception:  # rsa raises VerificationError on a bad signature
            verified = False
        if not verified:
            with LOCK:
                LEDGER["bad_signatures"] += 1
            error = {"code": "40002", "msg": "Invalid Arguments",
                     "sub_code": "isv.invalid-signature", "sub_msg": "验签出错"}
            name = method.replace(".", "_") + "_response"
            self.answer(json.dumps({name: error}, ensure_ascii=False).encode("utf-8"))
            return
        for name, wanted in [("format", "JSON"), ("charset", "utf-8"), ("version", "1.0")]:
            if params.get(name) != wanted:
                problem("%s=%r" % (name, params.get(name)))
        try:
            datetime.strptime(params.get("timestamp", ""), "%Y-%m-%d %H:%M:%S")
        except ValueError:
            problem("timestamp %r" % params.get("timestamp"))
        biz = json.loads(params.get("biz_content", "{}"))
        if method == "alipay.trade.pay":
            reply, key = pay(biz)
            self.answer(signed(method, reply, key))
        elif method == "alipay.trade.query":
            self.answer(signed(method, query(biz)))
        else:
            problem("method %r" % method)
            self.answer(signed(method, {"code": "40004", "sub_code": "ACQ.INVALID_METHOD"}))


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(json.dumps({
        "port": server.server_address[1],
        "merchant_private_key": body_of(MERCHANT.export_key(pkcs=1)),
        "alipay_public_key": body_of(ALIPAY.publickey().export_key()),
    }), flush=True)
    # Ends with the test: its stdin closes when the test process is gone.
    threading.Thread(target=lambda: (sys.stdin.read(), server.shutdown()), daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
