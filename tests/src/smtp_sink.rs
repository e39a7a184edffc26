//! An SMTP server for tests (RFC 5321, the part a client needs: EHLO, AUTH PLAIN/LOGIN,
//! MAIL, RCPT, DATA, RSET, NOOP, QUIT) on a random loopback port. It keeps every message it
//! accepts, and can be told to answer some recipients with a temporary (451) or permanent
//! (550) failure.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::bail;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::WAIT;

/// A message the sink accepted.
#[derive(Debug, Clone)]
pub struct ReceivedMail {
    /// Envelope recipients.
    pub to: Vec<String>,
    /// The user name the client authenticated with, if any.
    pub user: Option<String>,
    /// The raw message (headers and body, dot-unstuffed).
    pub data: Vec<u8>,
}

impl ReceivedMail {
    /// Subject and plain-text body, decoded (RFC 2047 words, base64, quoted-printable).
    pub fn subject_and_text(&self) -> (String, String) {
        let parsed = mail_parser::MessageParser::default().parse(&self.data);
        let subject = parsed.as_ref().and_then(|m| m.subject()).unwrap_or_default().to_string();
        let text = parsed
            .as_ref()
            .and_then(|m| m.body_text(0))
            .map(|t| t.trim().to_string())
            .unwrap_or_default();
        (subject, text)
    }
}

#[derive(Default)]
struct Inbox {
    mails: Vec<ReceivedMail>,
    /// Recipient → how many more messages to refuse with 451.
    flaky: HashMap<String, u32>,
    /// Recipients refused with 550.
    bouncing: Vec<String>,
    /// 451 answers given.
    temporary_failures: u32,
}

/// The running sink.
#[derive(Clone)]
pub struct SmtpSink {
    /// Port on 127.0.0.1.
    pub port: u16,
    inbox: Arc<Mutex<Inbox>>,
    arrived: Arc<Notify>,
}

impl SmtpSink {
    /// Starts on `127.0.0.1:0`.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let sink = Self {
            port: listener.local_addr()?.port(),
            inbox: Arc::default(),
            arrived: Arc::default(),
        };
        let server = sink.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let session = server.clone();
                tokio::spawn(async move {
                    if let Err(e) = session.serve(stream).await {
                        tracing::debug!(error = %e, "smtp session ended");
                    }
                });
            }
        });
        Ok(sink)
    }

    fn inbox(&self) -> std::sync::MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Refuse the next `times` messages to `recipient` with 451 (try again later).
    pub fn flaky(&self, recipient: &str, times: u32) {
        self.inbox().flaky.insert(recipient.to_string(), times);
    }

    /// Refuse every message to `recipient` with 550 (no such mailbox).
    pub fn bounce(&self, recipient: &str) {
        self.inbox().bouncing.push(recipient.to_string());
    }

    /// Every message accepted so far.
    pub fn mails(&self) -> Vec<ReceivedMail> {
        self.inbox().mails.clone()
    }

    /// How many 451 answers were given.
    pub fn temporary_failures(&self) -> u32 {
        self.inbox().temporary_failures
    }

    /// Waits (at most [`WAIT`]) until a message to `recipient` has arrived.
    pub async fn wait_for(&self, recipient: &str) -> anyhow::Result<ReceivedMail> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let arrived = self.arrived.notified();
            if let Some(mail) =
                self.mails().into_iter().find(|m| m.to.iter().any(|t| t == recipient))
            {
                return Ok(mail);
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                bail!("no mail to {recipient} within {WAIT:?}");
            }
        }
    }

    async fn serve(&self, stream: TcpStream) -> anyhow::Result<()> {
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read);
        write.write_all(b"220 sink.test ESMTP test sink\r\n").await?;
        let (mut to, mut user) = (Vec::new(), None);
        let mut awaiting_login_user = false;
        loop {
            let mut line = String::new();
            if lines.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let command = line.trim_end().to_string();
            let upper = command.to_ascii_uppercase();
            let reply: String = if awaiting_login_user {
                awaiting_login_user = false;
                user = decode_b64(&command);
                "334 UGFzc3dvcmQ6\r\n".into()
            } else if upper.starts_with("EHLO") {
                "250-sink.test\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 AUTH PLAIN LOGIN\r\n".into()
            } else if upper.starts_with("HELO") {
                "250 sink.test\r\n".into()
            } else if upper.starts_with("AUTH PLAIN") {
                // base64("\0user\0password")
                let decoded = decode_b64(command.split_whitespace().nth(2).unwrap_or_default());
                user = decoded.and_then(|d| d.split('\0').nth(1).map(str::to_string));
                "235 2.7.0 authenticated\r\n".into()
            } else if upper.starts_with("AUTH LOGIN") {
                awaiting_login_user = true;
                "334 VXNlcm5hbWU6\r\n".into()
            } else if upper.starts_with("MAIL FROM") || upper.starts_with("NOOP") {
                "250 2.1.0 ok\r\n".into()
            } else if upper.starts_with("RSET") {
                to.clear();
                "250 2.0.0 ok\r\n".into()
            } else if upper.starts_with("RCPT TO") {
                let address = command[8..]
                    .trim()
                    .trim_start_matches('<')
                    .split('>')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let mut inbox = self.inbox();
                if inbox.bouncing.contains(&address) {
                    "550 5.1.1 no such mailbox\r\n".into()
                } else if inbox.flaky.get(&address).is_some_and(|n| *n > 0) {
                    if let Some(n) = inbox.flaky.get_mut(&address) {
                        *n -= 1;
                    }
                    inbox.temporary_failures += 1;
                    "451 4.3.0 try again later\r\n".into()
                } else {
                    to.push(address);
                    "250 2.1.5 ok\r\n".into()
                }
            } else if upper.starts_with("DATA") {
                write.write_all(b"354 end with <CRLF>.<CRLF>\r\n").await?;
                let mut data = Vec::new();
                loop {
                    let mut raw = Vec::new();
                    if lines.read_until(b'\n', &mut raw).await? == 0 {
                        return Ok(());
                    }
                    if raw == b".\r\n" || raw == b".\n" {
                        break;
                    }
                    // Dot-unstuffing.
                    let content = if raw.starts_with(b"..") { &raw[1..] } else { &raw[..] };
                    data.extend_from_slice(content);
                }
                self.inbox().mails.push(ReceivedMail {
                    to: std::mem::take(&mut to),
                    user: user.clone(),
                    data,
                });
                self.arrived.notify_waiters();
                "250 2.0.0 queued\r\n".into()
            } else if upper.starts_with("QUIT") {
                write.write_all(b"221 2.0.0 bye\r\n").await?;
                return Ok(());
            } else {
                "502 5.5.2 command not implemented\r\n".into()
            };
            write.write_all(reply.as_bytes()).await?;
        }
    }
}

fn decode_b64(text: &str) -> Option<String> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD.decode(text.trim()).ok()?;
    String::from_utf8(bytes).ok()
}
