//! Audit index: keys that sort by event time, then by arrival, so equal
//! timestamps never overwrite each other and newest-first listing is a
//! reverse scan. Cursors are opaque (`tvc1:` + hex of the full key).

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

const CLASS_RAW: u8 = 0x00;
const CLASS_TIME: u8 = 0x01;
pub const CURSOR_PREFIX: &str = "tvc1:";

/// The sort prefix of a timestamp key (without the sequence suffix).
pub fn sort_prefix(key: &str) -> Vec<u8> {
    match OffsetDateTime::parse(key, &Rfc3339) {
        Ok(t) => {
            let n = t.unix_timestamp_nanos();
            let biased = (n as u128) ^ (1u128 << 127);
            let mut v = Vec::with_capacity(17);
            v.push(CLASS_TIME);
            v.extend_from_slice(&biased.to_be_bytes());
            v
        }
        Err(_) => {
            // Not a timestamp: keep the event, sorted before every real time.
            let mut v = Vec::with_capacity(key.len() + 2);
            v.push(CLASS_RAW);
            v.extend_from_slice(key.as_bytes());
            v.push(0);
            v
        }
    }
}

pub fn full_key(key: &str, seq: u64) -> Vec<u8> {
    let mut v = sort_prefix(key);
    v.extend_from_slice(&seq.to_be_bytes());
    v
}

pub fn cursor_for(full: &[u8]) -> String {
    format!("{CURSOR_PREFIX}{}", hex::encode(full))
}

/// The exclusive upper bound for "items older than `after`", or `None`
/// when `after` carries the cursor prefix but is not a key this index
/// makes (bad hex, wrong length or class): the caller refuses it rather
/// than restart the listing from the newest item.
pub fn upper_bound(after: &str) -> Option<Vec<u8>> {
    if let Some(h) = after.strip_prefix(CURSOR_PREFIX) {
        let k = hex::decode(h).ok()?;
        let seq = 8;
        let well_formed = match k.first() {
            Some(&CLASS_TIME) => k.len() == 1 + 16 + seq,
            Some(&CLASS_RAW) => k.len() >= 1 + 1 + seq && k[k.len() - seq - 1] == 0,
            _ => false,
        };
        return well_formed.then_some(k);
    }
    // A bare timestamp: everything strictly older than it.
    let mut v = sort_prefix(after);
    v.extend_from_slice(&0u64.to_be_bytes());
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_order_not_string_order() {
        // "…00.5Z" is later than "…00Z" although it sorts lower as a string.
        let a = full_key("2026-02-15T10:30:00Z", 1);
        let b = full_key("2026-02-15T10:30:00.5Z", 2);
        let c = full_key("2026-02-15T11:30:00+01:00", 3); // same instant as a
        assert!(a < b);
        assert!(c > a && c < b);
        assert!(full_key("1969-12-31T23:59:59Z", 9) < full_key("1970-01-01T00:00:00Z", 1));
        assert!(full_key("not a time", 5) < full_key("1900-01-01T00:00:00Z", 1));
        let cur = cursor_for(&b);
        assert_eq!(upper_bound(&cur).unwrap(), b);
        assert!(upper_bound("2026-02-15T10:30:00Z").unwrap() < a);
        let raw = full_key("not a time", 5);
        assert_eq!(upper_bound(&cursor_for(&raw)).unwrap(), raw);
    }

    #[test]
    fn malformed_cursors_are_refused_not_read_as_the_start() {
        let good = cursor_for(&full_key("2026-02-15T10:30:00Z", 1));
        for bad in [
            "tvc1:zz".to_string(),
            "tvc1:".to_string(),
            "tvc1:0".to_string(),
            format!("{good}00"),
            good[..good.len() - 2].to_string(),
            format!("tvc1:02{}", &good[7..]),
            // Raw class without the terminator before the sequence.
            format!("tvc1:00{}", hex::encode([b'x'; 9])),
        ] {
            assert_eq!(upper_bound(&bad), None, "{bad}");
        }
    }
}
