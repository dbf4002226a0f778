//! One canonical form for addresses. Every comparison of a client or
//! upstream address (deny lists, trusted proxies, the loopback decision,
//! rate-limit and connection-cap keys, the egress policy) goes through
//! [`canonical`] first, so an IPv4 client seen on a dual-stack listener as
//! `::ffff:a.b.c.d` matches the IPv4 rules written for `a.b.c.d`.
//! Pure: no I/O.

use ipnet::{IpNet, Ipv4Net};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) becomes IPv4; anything else as is.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// [`canonical`] for a socket address (the port is kept).
pub fn canonical_socket(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical(a.ip()), a.port())
}

/// A configured network in canonical form: `::ffff:a.b.c.d/n` (n >= 96)
/// becomes `a.b.c.d/(n-96)`, so an operator may write either.
pub fn canonical_net(n: IpNet) -> IpNet {
    match n {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(IpNet::V4)
                .unwrap_or(n),
            None => n,
        },
        other => other,
    }
}

/// [`canonical_net`] over a list.
pub fn canonical_nets(nets: &[IpNet]) -> Vec<IpNet> {
    nets.iter().copied().map(canonical_net).collect()
}

/// Whether any of `nets` (canonical) contains `ip` (made canonical here).
pub fn in_any(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = canonical(ip);
    nets.iter().any(|n| n.contains(&ip))
}

/// Whether the address is loopback, in either family or mapped.
pub fn is_loopback(ip: IpAddr) -> bool {
    canonical(ip).is_loopback()
}

/// The key one client is counted under (rate limits, connection caps): an
/// IPv4 address as is, an IPv6 address cut to its first `v6_prefix` bits
/// (a /64 by default: one subscriber's whole allocation counts as one).
pub fn client_key(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let p = u32::from(v6_prefix.min(128));
            let mask = if p == 0 { 0 } else { u128::MAX << (128 - p) };
            IpAddr::V6(Ipv6Addr::from(bits & mask))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_ipv4_matches_ipv4_rules() {
        let mapped: IpAddr = "::ffff:198.51.100.7".parse().unwrap();
        let v4: IpAddr = "198.51.100.7".parse().unwrap();
        assert_eq!(canonical(mapped), v4);
        let nets = vec!["198.51.100.7/32".parse::<IpNet>().unwrap()];
        assert!(in_any(&nets, mapped));
        assert!(!in_any(&nets, "::ffff:198.51.100.8".parse().unwrap()));
        assert!(is_loopback("::ffff:127.0.0.2".parse().unwrap()));
        assert!(is_loopback("::1".parse().unwrap()));
        assert!(!is_loopback("::ffff:10.0.0.1".parse().unwrap()));
        let sock: SocketAddr = "[::ffff:127.0.0.1]:443".parse().unwrap();
        assert_eq!(canonical_socket(sock), "127.0.0.1:443".parse().unwrap());
    }

    #[test]
    fn configured_mapped_networks_become_ipv4() {
        let n: IpNet = "::ffff:192.0.2.0/120".parse().unwrap();
        assert_eq!(canonical_net(n), "192.0.2.0/24".parse::<IpNet>().unwrap());
        let plain: IpNet = "2001:db8::/32".parse().unwrap();
        assert_eq!(canonical_net(plain), plain);
        let nets = canonical_nets(&[n]);
        assert!(in_any(&nets, "192.0.2.9".parse().unwrap()));
        assert!(in_any(&nets, "::ffff:192.0.2.9".parse().unwrap()));
    }

    #[test]
    fn ipv6_clients_are_counted_per_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a, 64), client_key(b, 64));
        assert_ne!(client_key(a, 64), client_key(c, 64));
        assert_ne!(client_key(a, 128), client_key(b, 128));
        let v4: IpAddr = "::ffff:203.0.113.4".parse().unwrap();
        assert_eq!(client_key(v4, 64), "203.0.113.4".parse::<IpAddr>().unwrap());
    }
}
