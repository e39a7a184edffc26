//! Alipay's gateway for the tests: `tests/alipay/alipay_server.py`, which checks our
//! signatures and signs its answers with Alipay's official Python SDK (see its docstring
//! for the agreements and their answers), run with the Python `scripts/test` prepared.
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;
use tokio::io::AsyncBufReadExt;

/// The interpreter with the SDK: `TOPUP_PYTHON`, set by `scripts/test`.
fn python() -> anyhow::Result<PathBuf> {
    match std::env::var_os("TOPUP_PYTHON") {
        Some(path) => Ok(PathBuf::from(path)),
        None => bail!(
            "TOPUP_PYTHON is not set: run the tests with scripts/test, which installs Alipay's \
             SDK (tests/python-requirements.txt) and sets it"
        ),
    }
}

/// The running server; stopped when dropped.
pub struct AlipayServer {
    /// `ALIPAY_GATEWAY_URL`.
    pub url: String,
    /// The merchant's private key, to write to `ALIPAY_PRIVATE_KEY_FILE`.
    pub merchant_private_key: String,
    /// Alipay's public key, to write to `ALIPAY_PUBLIC_KEY_FILE`.
    pub alipay_public_key: String,
    _child: tokio::process::Child,
}

impl AlipayServer {
    /// Starts the server (it makes its keys first: a few seconds).
    pub async fn start() -> anyhow::Result<Self> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/alipay/alipay_server.py");
        let python = python()?;
        let mut child = crate::child_command(&python)
            .arg(script)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} {script}", python.display()))?;
        let stdout = child.stdout.take().context("the server's stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .context("the Alipay test server did not start in 60 s")??
            .context("the Alipay test server ended before it started (its stderr is above)")?;
        let started: Value = serde_json::from_str(&first)
            .with_context(|| format!("the Alipay test server said {first:?}"))?;
        let text = |name: &str| started[name].as_str().unwrap_or_default().to_string();
        let port = started["port"].as_u64().context("no port")?;
        Ok(Self {
            url: format!("http://127.0.0.1:{port}/gateway.do"),
            merchant_private_key: text("merchant_private_key"),
            alipay_public_key: text("alipay_public_key"),
            _child: child,
        })
    }

    /// What the server saw.
    pub async fn ledger(&self) -> anyhow::Result<Ledger> {
        let url = self.url.replace("/gateway.do", "/_ledger");
        let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
        let ledger: Value = client.get(url).send().await?.json().await?;
        let counts = |name: &str| -> HashMap<String, u64> {
            ledger[name]
                .as_object()
                .map(|o| o.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0))).collect())
                .unwrap_or_default()
        };
        Ok(Ledger {
            charges: counts("charges"),
            by_agreement: counts("by_agreement"),
            requests: counts("requests"),
            queries: counts("queries"),
            bad_signatures: ledger["bad_signatures"].as_u64().unwrap_or(0),
            problems: ledger["problems"]
                .as_array()
                .map(|a| a.iter().map(|p| p.to_string()).collect())
                .unwrap_or_default(),
        })
    }
}

/// What the Alipay test server saw, per `out_trade_no` unless said.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Payments made.
    pub charges: HashMap<String, u64>,
    /// Payments made per agreement.
    pub by_agreement: HashMap<String, u64>,
    /// `alipay.trade.pay` requests.
    pub requests: HashMap<String, u64>,
    /// `alipay.trade.query` requests.
    pub queries: HashMap<String, u64>,
    /// Requests whose signature the SDK did not verify.
    pub bad_signatures: u64,
    /// Requests not shaped as Alipay wants.
    pub problems: Vec<String>,
}
