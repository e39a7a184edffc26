//! E-mail over SMTP with lettre: STARTTLS, implicit TLS or plain (for a local relay or a
//! mail catcher), optional authentication. SMTP's own reply classes decide retries: 4xx
//! is transient, 5xx permanent.
use std::time::Duration;

use lettre::message::{header::ContentType, Mailbox};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use secrecy::{ExposeSecret, SecretString};

use super::{Channel, ChannelError, Delivery};

/// How the connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SmtpTls {
    /// Plain text, then upgraded with STARTTLS (refused if the server cannot).
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No TLS: a relay on the same host or a mail catcher only.
    None,
}

/// Where and how to send e-mail.
#[derive(Debug, Clone)]
pub struct SmtpConfig {
    /// Server host name.
    pub host: String,
    /// Server port.
    pub port: u16,
    /// Connection protection.
    pub tls: SmtpTls,
    /// User name and password, when the server wants them.
    pub credentials: Option<(String, SecretString)>,
    /// The sender, `Top-up <topup@example.com>`.
    pub from: String,
    /// Longest wait for the server.
    pub timeout: Duration,
}

/// The SMTP channel. Clones share the connection pool.
#[derive(Clone)]
pub struct Smtp {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    described: String,
}

impl std::fmt::Debug for Smtp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Smtp").field("server", &self.described).finish_non_exhaustive()
    }
}

impl Smtp {
    /// A channel for `config`; fails on an unusable sender address or TLS setup.
    pub fn new(config: &SmtpConfig) -> anyhow::Result<Self> {
        let from: Mailbox = config
            .from
            .parse()
            .map_err(|e| anyhow::anyhow!("--smtp-from {:?} is not a mailbox: {e}", config.from))?;
        let mut builder = match config.tls {
            SmtpTls::Starttls => {
                AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&config.host)?
            }
            SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&config.host)?,
            SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&config.host),
        };
        builder = builder.port(config.port).timeout(Some(config.timeout));
        if let Some((user, password)) = &config.credentials {
            builder = builder
                .credentials(Credentials::new(user.clone(), password.expose_secret().to_string()));
        }
        let described = format!("smtp {}:{} ({:?})", config.host, config.port, config.tls);
        Ok(Self { transport: builder.build(), from, described })
    }

    /// Where it sends, for logs.
    pub fn describe(&self) -> String {
        self.described.clone()
    }
}

impl Channel for Smtp {
    async fn deliver(&self, delivery: &Delivery<'_>) -> Result<(), ChannelError> {
        let to: Mailbox = delivery.address.parse().map_err(|e| {
            ChannelError::Permanent(format!("{} is not an e-mail address: {e}", delivery.masked))
        })?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(delivery.subject)
            .header(ContentType::TEXT_PLAIN)
            .body(delivery.text.to_string())
            .map_err(|e| ChannelError::Permanent(format!("building the message: {e}")))?;
        match self.transport.send(message).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_permanent() => Err(ChannelError::Permanent(e.to_string())),
            Err(e) => Err(ChannelError::Transient(e.to_string())),
        }
    }
}
