//! Egress policy for every outbound call made on a caller's word (proxy
//! upstreams, GCP token URIs from stored service-account keys): which
//! addresses the appliance may connect to. Enforced in the DNS resolver handed to the HTTP client, so the
//! check applies to exactly the addresses the client then connects to (no
//! DNS-rebinding gap), and on IP literals before any request.

use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    pub allow_loopback: bool,
    pub deny_hosts: Vec<String>,
    pub deny_cidrs: Vec<IpNet>,
    pub allow_cidrs: Vec<IpNet>,
}

fn is_special(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_private() {
                Some("private")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if v4.is_unspecified() || v4.is_broadcast() || v4.octets()[0] == 0 {
                Some("unspecified")
            } else if v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64 {
                Some("shared address space")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_special(IpAddr::V4(v4));
            }
            let seg0 = v6.segments()[0];
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if (seg0 & 0xfe00) == 0xfc00 {
                Some("private (ULA)")
            } else if (seg0 & 0xffc0) == 0xfe80 {
                Some("link-local")
            } else {
                None
            }
        }
    }
}

impl EgressPolicy {
    /// Why `ip` may not be connected to, if it may not.
    pub fn refuse_ip(&self, ip: IpAddr) -> Option<&'static str> {
        let ip = crate::netaddr::canonical(ip);
        if crate::netaddr::in_any(&self.deny_cidrs, ip) {
            return Some("denied by proxy.deny_cidrs");
        }
        if crate::netaddr::in_any(&self.allow_cidrs, ip) {
            return None;
        }
        match is_special(ip) {
            Some("loopback") if self.allow_loopback => None,
            other => other,
        }
    }

    pub fn refuse_host(&self, host: &str) -> bool {
        self.deny_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(host.trim_end_matches('.')))
    }
}

/// Resolver for the upstream client: resolves, then keeps only allowed
/// addresses; none left is an error, so the client never connects.
pub struct PolicyResolver(pub Arc<EgressPolicy>);

impl EgressPolicy {
    /// Why `url`'s host may not be called, checked before any connection:
    /// IP literals and denied names here; the addresses a name resolves to
    /// are checked by [`PolicyResolver`], on exactly those connected to.
    pub fn refuse_url(&self, url: &url::Url) -> Option<&'static str> {
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.refuse_ip(ip.into()),
            Some(url::Host::Ipv6(ip)) => self.refuse_ip(ip.into()),
            Some(url::Host::Domain(d)) if self.refuse_host(d) => Some("host denied"),
            Some(url::Host::Domain(_)) => None,
            None => Some("no host"),
        }
    }
}

/// An HTTP client builder whose every connection passes `policy`, and
/// which follows no redirect (a redirect would leave the policy's reach).
pub fn client_builder(policy: &Arc<EgressPolicy>) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .dns_resolver(Arc::new(PolicyResolver(policy.clone())))
        .redirect(reqwest::redirect::Policy::none())
}

/// Whether a client error is the policy refusing the connection.
pub fn refused(e: &reqwest::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if s.downcast_ref::<EgressRefused>().is_some() {
            return true;
        }
        src = s.source();
    }
    false
}

#[derive(Debug, thiserror::Error)]
#[error("egress refused: {0}")]
pub struct EgressRefused(pub String);

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            if policy.refuse_host(&host) {
                return Err(Box::new(EgressRefused("host denied".into())) as _);
            }
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = addrs
                .iter()
                .copied()
                .filter(|a| policy.refuse_ip(a.ip()).is_none())
                .collect();
            if allowed.is_empty() {
                let why = addrs
                    .first()
                    .and_then(|a| policy.refuse_ip(a.ip()))
                    .unwrap_or("no address");
                return Err(Box::new(EgressRefused(why.into())) as _);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_classes() {
        let p = EgressPolicy::default();
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "100.64.0.1",
            "::",
        ] {
            assert!(p.refuse_ip(bad.parse().unwrap()).is_some(), "{bad}");
        }
        for good in ["93.184.216.34", "2606:4700::1111", "8.8.8.8"] {
            assert!(p.refuse_ip(good.parse().unwrap()).is_none(), "{good}");
        }
        let dev = EgressPolicy {
            allow_loopback: true,
            ..Default::default()
        };
        assert!(dev.refuse_ip("127.0.0.1".parse().unwrap()).is_none());
        assert!(dev.refuse_ip("::1".parse().unwrap()).is_none());
        assert!(
            dev.refuse_ip("169.254.169.254".parse().unwrap()).is_some(),
            "metadata stays refused"
        );
        let custom = EgressPolicy {
            allow_cidrs: vec!["10.9.0.0/16".parse().unwrap()],
            deny_cidrs: vec!["8.8.8.0/24".parse().unwrap()],
            deny_hosts: vec!["evil.example".into()],
            ..Default::default()
        };
        assert!(custom.refuse_ip("10.9.1.1".parse().unwrap()).is_none());
        assert!(custom.refuse_ip("10.8.1.1".parse().unwrap()).is_some());
        assert!(custom.refuse_ip("8.8.8.8".parse().unwrap()).is_some());
        assert!(custom.refuse_host("EVIL.example."));
        let u = |s: &str| url::Url::parse(s).unwrap();
        assert_eq!(
            custom.refuse_url(&u("https://evil.example/x")),
            Some("host denied")
        );
        assert!(custom
            .refuse_url(&u("https://169.254.169.254/token"))
            .is_some());
        assert!(custom.refuse_url(&u("https://[::1]:8443/")).is_some());
        assert_eq!(
            custom.refuse_url(&u("https://oauth2.googleapis.com/token")),
            None
        );
    }
}
