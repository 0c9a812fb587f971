//! The AWS EC2 backend: StartInstances, DescribeInstances and StopInstances on EC2's Query API, signed
//! with SigV4 (the signer crate alone; the SDK would bring a runtime for three calls).
//!
//! A hibernation is StopInstances with `Hibernate=true`: the guest writes its memory to its root volume and
//! the instance stops; the next StartInstances resumes it. EC2 tells a hibernated instance by its state
//! reason, `Client.UserInitiatedHibernate`.

use std::{
    net::IpAddr,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, ensure};
use aws_credential_types::Credentials;
use aws_sigv4::{
    http_request::{SignableBody, SignableRequest, SigningSettings, sign},
    sign::v4,
};
use serde::{Deserialize, Serialize};

use super::{Lookup, Power, ec2_credentials};
use crate::error::Failure;

const API_VERSION: &str = "2016-11-15";
/// The state reason of an instance stopped by a hibernation.
const HIBERNATED: &str = "Client.UserInitiatedHibernate";
const FORM: &str = "application/x-www-form-urlencoded; charset=utf-8";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Ec2Config {
    pub region: String,
    /// Default: `https://ec2.REGION.amazonaws.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<url::Url>,
    /// An AWS shared credentials file; default: the `aws-credentials` systemd credential, else
    /// `$AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    /// The section of that file.
    #[serde(default = "default_profile")]
    pub aws_profile: String,
    /// Which address the proxy connects to.
    #[serde(default)]
    pub address: AddressKind,
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
}

fn default_profile() -> String {
    "default".into()
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressKind {
    /// The VPC address, known as soon as the instance exists: the proxy runs in the same VPC or a peered one.
    #[default]
    Private,
    /// The public IPv4 address, assigned while the instance starts.
    Public,
    /// The instance's first IPv6 address.
    Ipv6,
}

impl Ec2Config {
    pub fn check(&self) -> Result<()> {
        ensure!(
            !self.region.is_empty()
                && self
                    .region
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "region {:?} is not an AWS region name",
            self.region
        );
        Ok(())
    }
}

pub fn check_instance_id(vm: &str) -> Result<()> {
    let hex = vm.strip_prefix("i-").unwrap_or_default();
    ensure!(
        !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit()),
        "{vm:?} is not an EC2 instance id (i-0123456789abcdef0)"
    );
    Ok(())
}

pub struct Ec2 {
    config: Ec2Config,
    endpoint: url::Url,
    credentials: Credentials,
    client: reqwest::Client,
}

impl Ec2 {
    pub fn new(config: &Ec2Config) -> Result<Ec2> {
        let path = ec2_credentials::locate(config.credentials_file.as_deref())?;
        let found = ec2_credentials::load(&path, &config.aws_profile)?;
        let credentials = Credentials::new(
            found.access_key_id,
            found.secret_access_key.expose(),
            found.session_token.map(|t| t.expose().to_owned()),
            None,
            "ssh-on-demand-api",
        );
        let endpoint = match &config.endpoint {
            Some(url) => url.clone(),
            None => format!("https://ec2.{}.amazonaws.com/", config.region)
                .parse()
                .context("the region makes no valid endpoint")?,
        };
        let client = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .user_agent(concat!("ssh-on-demand-api/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client")?;
        Ok(Ec2 {
            config: config.clone(),
            endpoint,
            credentials,
            client,
        })
    }

    pub async fn power(&self, vm: &str) -> Result<Power, Failure> {
        let xml = self.call("DescribeInstances", vm, &[]).await?;
        let state = instance_field(&xml, vm, &["instanceState", "name"])?;
        Ok(match state.as_deref() {
            Some("running") => Power::Running,
            Some("pending") => Power::Starting,
            Some("stopping" | "shutting-down") => Power::Stopping,
            Some("stopped")
                if instance_field(&xml, vm, &["stateReason", "code"])?.as_deref()
                    == Some(HIBERNATED) =>
            {
                Power::Suspended
            }
            Some("stopped") => Power::Off,
            Some(other) => Power::Other(other.to_owned()),
            None => Power::Other("unknown".into()),
        })
    }

    pub async fn start(&self, vm: &str) -> Result<(), Failure> {
        self.call("StartInstances", vm, &[]).await.map(drop)
    }

    pub async fn address(&self, vm: &str) -> Result<Lookup, Failure> {
        let xml = self.call("DescribeInstances", vm, &[]).await?;
        let path: &[&str] = match self.config.address {
            AddressKind::Private => &["privateIpAddress"],
            AddressKind::Public => &["ipAddress"],
            AddressKind::Ipv6 => &[
                "networkInterfaceSet",
                "item",
                "ipv6AddressesSet",
                "item",
                "ipv6Address",
            ],
        };
        let found = instance_field(&xml, vm, path)?.and_then(|a| a.parse::<IpAddr>().ok());
        Ok(match found {
            Some(ip) => Lookup::Found(ip),
            None => {
                let state =
                    instance_field(&xml, vm, &["instanceState", "name"])?.unwrap_or_default();
                Lookup::NotYet(
                    format!(
                        "instance {vm} ({state}) has no {:?} address yet",
                        self.config.address
                    )
                    .to_lowercase(),
                )
            }
        })
    }

    /// StopInstances with `Hibernate=true`, once DescribeInstances says the instance was launched for it: a
    /// clear refusal beats EC2's own, which does not name what to change.
    pub async fn hibernate(&self, vm: &str) -> Result<(), Failure> {
        let xml = self.call("DescribeInstances", vm, &[]).await?;
        let configured = instance_field(&xml, vm, &["hibernationOptions", "configured"])?;
        if configured.as_deref() != Some("true") {
            return Err(Failure::refused(format!(
                "instance {vm} cannot hibernate: it was not launched with hibernation enabled \
                 (HibernationOptions Configured=true, which also needs an encrypted EBS root volume with room \
                 for its memory and a supported instance type and AMI); set if_suspend_fails = \"shutdown\" \
                 to stop it instead"
            )));
        }
        self.call("StopInstances", vm, &[("Hibernate", "true")])
            .await
            .map(drop)
    }

    pub async fn stop(&self, vm: &str, force: bool) -> Result<(), Failure> {
        let extra: &[(&str, &str)] = if force { &[("Force", "true")] } else { &[] };
        self.call("StopInstances", vm, extra).await.map(drop)
    }

    /// One signed Query API call about one instance; returns the XML answer. EC2's error message and code
    /// are what the user reads.
    async fn call(
        &self,
        action: &str,
        vm: &str,
        extra: &[(&str, &str)],
    ) -> Result<String, Failure> {
        let body = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("Action", action)
                .append_pair("Version", API_VERSION)
                .append_pair("InstanceId.1", vm);
            form.extend_pairs(extra);
            form.finish()
        };
        let headers = self
            .sign(&body)
            .map_err(|e| Failure::refused(format!("signing the {action} request: {e:#}")))?;
        let mut request = self
            .client
            .post(self.endpoint.clone())
            .header("Content-Type", FORM)
            .body(body);
        for (name, mut value) in headers {
            value.set_sensitive(
                name.eq_ignore_ascii_case("authorization")
                    || name.eq_ignore_ascii_case("x-amz-security-token"),
            );
            request = request.header(name, value);
        }
        let response = request.send().await.map_err(|e| {
            Failure::unreachable(format!("cannot reach EC2 at {}", self.endpoint), e)
        })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| Failure::unreachable("reading EC2's answer", e))?;
        if status.is_success() {
            return Ok(text);
        }
        let (code, message) = error_of(&text);
        tracing::debug!(%status, action, code, message, "EC2 refused");
        let words = format!("{message} ({code})");
        let transient = status.is_server_error()
            || matches!(
                code.as_str(),
                "RequestLimitExceeded" | "Throttling" | "InternalError" | "Unavailable"
            );
        Err(if transient {
            Failure::unavailable(words)
        } else {
            Failure::refused(words)
        })
    }

    /// The SigV4 headers for a POST of `body` to the endpoint.
    fn sign(&self, body: &str) -> Result<Vec<(String, reqwest::header::HeaderValue)>> {
        let host = match (self.endpoint.host_str(), self.endpoint.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_owned(),
            (None, _) => anyhow::bail!("the endpoint {} has no host", self.endpoint),
        };
        let identity = self.credentials.clone().into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.config.region)
            .name("ec2")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()?
            .into();
        let signable = SignableRequest::new(
            "POST",
            self.endpoint.as_str(),
            [("host", host.as_str()), ("content-type", FORM)].into_iter(),
            SignableBody::Bytes(body.as_bytes()),
        )?;
        let (instructions, _) = sign(signable, &params)?.into_parts();
        instructions
            .headers()
            .map(|(name, value)| {
                Ok((
                    name.to_owned(),
                    reqwest::header::HeaderValue::from_str(value)?,
                ))
            })
            .collect()
    }
}

/// The text at `path` (element names, each a direct child of the previous) under the instance `vm` in a
/// DescribeInstances answer; Ok(None) if the element is absent, an error if the instance is.
fn instance_field(xml: &str, vm: &str, path: &[&str]) -> Result<Option<String>, Failure> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| {
        Failure::unavailable(format!("EC2 answered something that is not XML: {e}"))
    })?;
    let instance = doc
        .descendants()
        .find(|n| n.has_tag_name("instanceId") && n.text() == Some(vm))
        .and_then(|n| n.parent())
        .ok_or_else(|| Failure::refused(format!("EC2 does not list instance {vm}")))?;
    let mut node = instance;
    for name in path {
        match node.children().find(|c| c.has_tag_name(*name)) {
            Some(child) => node = child,
            None => return Ok(None),
        }
    }
    Ok(node
        .text()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty()))
}

/// `(Code, Message)` of an EC2 error answer.
fn error_of(xml: &str) -> (String, String) {
    let doc = roxmltree::Document::parse(xml).ok();
    let text = |tag: &str| {
        doc.as_ref()
            .and_then(|d| d.descendants().find(|n| n.has_tag_name(tag)))
            .and_then(|n| n.text())
            .map(|t| t.trim().to_owned())
    };
    let code = text("Code").unwrap_or_else(|| "UnknownError".into());
    let message = text("Message").unwrap_or_else(|| {
        let shown: String = xml.chars().take(200).collect();
        format!("EC2 answered without an error message: {shown}")
    });
    (code, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    const DESCRIBE: &str = r#"<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
      <reservationSet><item><instancesSet><item>
        <instanceId>i-0abc</instanceId>
        <instanceState><code>16</code><name>running</name></instanceState>
        <privateIpAddress>192.0.2.10</privateIpAddress>
        <networkInterfaceSet><item><privateIpAddress>192.0.2.99</privateIpAddress></item></networkInterfaceSet>
      </item></instancesSet></item></reservationSet></DescribeInstancesResponse>"#;

    #[test]
    fn fields_of_the_named_instance_only() {
        let ip = instance_field(DESCRIBE, "i-0abc", &["privateIpAddress"]).unwrap();
        assert_eq!(ip.as_deref(), Some("192.0.2.10"));
        let state = instance_field(DESCRIBE, "i-0abc", &["instanceState", "name"]).unwrap();
        assert_eq!(state.as_deref(), Some("running"));
        assert_eq!(
            instance_field(DESCRIBE, "i-0abc", &["ipAddress"]).unwrap(),
            None
        );
        assert_eq!(
            instance_field(DESCRIBE, "i-0def", &["ipAddress"]).map_err(|e| e.kind()),
            Err(Kind::Refused)
        );
    }

    #[test]
    fn errors_give_code_and_message() {
        let xml = "<Response><Errors><Error><Code>IncorrectInstanceState</Code>\
                   <Message>The instance is not in a state from which it can be started.</Message>\
                   </Error></Errors><RequestID>x</RequestID></Response>";
        let (code, message) = error_of(xml);
        assert_eq!(code, "IncorrectInstanceState");
        assert!(message.starts_with("The instance is not"));
        assert!(check_instance_id("i-0123abcd").is_ok());
        assert!(check_instance_id("0123").is_err());
    }
}
