//! PostgreSQL's `pg_lsn` text form (`16/B374D848`: the high and low 32 bits
//! in hex), parsed and written in one place for `pg` and `testing`.

/// The position `text` names, if it is `pg_lsn` text: two hex numbers of
/// one to eight digits each, separated by `/`.
pub(crate) fn parse(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    let digits =
        |s: &str| !s.is_empty() && s.len() <= 8 && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !digits(hi) || !digits(lo) {
        return None;
    }
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some((u64::from(hi) << 32) | u64::from(lo))
}

/// `lsn` as PostgreSQL writes it.
pub(crate) fn format(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_postgres_would_not_write() {
        for lsn in [0, 1, 0x16_B374_D848, u64::MAX] {
            assert_eq!(parse(&format(lsn)), Some(lsn));
        }
        assert_eq!(format(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse("0/0"), Some(0));
        assert_eq!(parse("ff/ff"), Some(0xFF_0000_00FF));
        for bad in [
            "",
            "/",
            "1/",
            "/1",
            "1",
            "1/2/3",
            "+1/2",
            "1/-2",
            "123456789/0",
            "g/0",
            " 1/2",
            "1/2 ",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
