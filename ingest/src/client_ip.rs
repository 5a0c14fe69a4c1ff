//! Which address a click came from.
//!
//! The socket peer, unless the peer is a trusted proxy: then the right-most address of the
//! one header the operator names (`INGEST_CLIENT_IP_HEADER`: `X-Forwarded-For`, or
//! `Forwarded: for=`) that is not itself a trusted proxy. The other header is ignored:
//! behind a proxy that writes only `Forwarded`, a client-sent `X-Forwarded-For` would
//! otherwise pick the address (rate-limit bypass, poisoned `ip_hash`). Walking from the
//! right means a client cannot choose its address by sending a forged header: everything
//! left of the first untrusted hop is the client's own claim.

use std::net::IpAddr;

use hyper::header::HeaderMap;
use ipnet::IpNet;

/// The header a trusted proxy writes the client address into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientIpHeader {
    #[value(name = "x-forwarded-for")]
    XForwardedFor,
    #[value(name = "forwarded")]
    Forwarded,
}

pub fn client_ip(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &[IpNet],
    header: ClientIpHeader,
) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let chain: Vec<Option<IpAddr>> = match header {
        ClientIpHeader::XForwardedFor => headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(parse_addr)
            .collect(),
        ClientIpHeader::Forwarded => headers
            .get_all("forwarded")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|element| {
                element
                    .split(';')
                    .filter_map(|pair| pair.split_once('='))
                    .find(|(k, _)| k.trim().eq_ignore_ascii_case("for"))
                    .and_then(|(_, v)| parse_addr(v.trim().trim_matches('"')))
            })
            .collect(),
    };
    let mut client = peer;
    for hop in chain.iter().rev() {
        match hop {
            // Garbage where an address belongs: stop at the last hop we could verify.
            None => break,
            Some(ip) => {
                client = ip.to_canonical();
                if !is_trusted(&client) {
                    break;
                }
            }
        }
    }
    client
}

/// `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]:80`; anything else is `None`.
fn parse_addr(raw: &str) -> Option<IpAddr> {
    let s = raw.trim();
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split_once(']').and_then(|(ip, _)| ip.parse().ok());
    }
    s.rsplit_once(':').and_then(|(ip, port)| {
        port.parse::<u16>().ok()?;
        ip.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().expect("cidr")).collect()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).expect("header"));
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    const XFF: ClientIpHeader = ClientIpHeader::XForwardedFor;

    #[test]
    fn untrusted_peer_is_the_client_whatever_it_claims() {
        let h = headers(&[("x-forwarded-for", "1.1.1.1"), ("forwarded", "for=2.2.2.2")]);
        assert_eq!(
            client_ip(ip("203.0.113.9"), &h, &nets(&["10.0.0.0/8"]), XFF),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_ip(ip("203.0.113.9"), &h, &[], XFF),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn trusted_peer_takes_right_most_untrusted_hop() {
        let trusted = nets(&["10.0.0.0/8"]);
        // The client forged 6.6.6.6; 198.51.100.7 is what our proxy saw.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 198.51.100.7, 10.0.0.3")]);
        assert_eq!(
            client_ip(ip("10.0.0.2"), &h, &trusted, XFF),
            ip("198.51.100.7")
        );
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "198.51.100.7:5555"),
        ]);
        assert_eq!(
            client_ip(ip("10.0.0.2"), &h, &trusted, XFF),
            ip("198.51.100.7")
        );
    }

    #[test]
    fn only_the_configured_header_is_read() {
        let trusted = nets(&["10.0.0.0/8"]);
        let fwd = ClientIpHeader::Forwarded;
        let h = headers(&[(
            "forwarded",
            "for=6.6.6.6, for=\"[2001:db8::17]:4711\";proto=https",
        )]);
        assert_eq!(
            client_ip(ip("10.0.0.2"), &h, &trusted, fwd),
            ip("2001:db8::17")
        );
        // Our proxy writes Forwarded; the client smuggles X-Forwarded-For: ignored.
        let h = headers(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("forwarded", "for=198.51.100.7"),
        ]);
        assert_eq!(
            client_ip(ip("10.0.0.2"), &h, &trusted, fwd),
            ip("198.51.100.7")
        );
        // And the other way round.
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted, XFF), ip("1.2.3.4"));
        let h = headers(&[("forwarded", "for=198.51.100.7")]);
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted, XFF), ip("10.0.0.2"));
    }

    #[test]
    fn garbage_stops_the_walk() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = headers(&[("x-forwarded-for", "198.51.100.7, nonsense, 10.0.0.5")]);
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted, XFF), ip("10.0.0.5"));
        assert_eq!(
            client_ip(ip("10.0.0.2"), &HeaderMap::new(), &trusted, XFF),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn mapped_ipv4_peers_are_canonical() {
        let peer: IpAddr = "::ffff:203.0.113.9".parse().expect("ip");
        assert_eq!(
            client_ip(peer, &HeaderMap::new(), &[], XFF),
            ip("203.0.113.9")
        );
    }
}
