//! Keeping secrets (connection URL passwords) out of `Debug` output and
//! error messages.

/// `text` with the password of every connection URL in it
/// (`scheme://user:PASSWORD@host`) and every `password=...` pair of a
/// key-value connection string replaced by `***`.
pub(crate) fn secrets(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    // URLs: from each `://`, the authority's user info up to `@`.
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let authority_end = tail
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace() || c == '"')
            .unwrap_or(tail.len());
        let authority = &tail[..authority_end];
        match (authority.rfind('@'), authority.find(':')) {
            (Some(user_end), Some(colon)) if colon < user_end => {
                out.push_str(&authority[..=colon]);
                out.push_str("***");
                out.push_str(&authority[user_end..]);
            }
            _ => out.push_str(authority),
        }
        rest = &tail[authority_end..];
    }
    out.push_str(rest);
    key_value_passwords(&out)
}

/// `password=VALUE` (quoted or not) becomes `password=***`.
fn key_value_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = find_ascii_case_insensitive(rest, "password") {
        let (head, tail) = rest.split_at(at + "password".len());
        out.push_str(head);
        let trimmed = tail.trim_start();
        let Some(value) = trimmed.strip_prefix('=') else {
            rest = tail;
            continue;
        };
        out.push_str(&tail[..tail.len() - trimmed.len()]);
        out.push('=');
        let value = value.trim_start();
        let end = if let Some(quoted) = value.strip_prefix('\'') {
            // A quoted value ends at the next unescaped quote.
            let mut escaped = false;
            quoted
                .char_indices()
                .find(|&(_, c)| {
                    let end = c == '\'' && !escaped;
                    escaped = c == '\\' && !escaped;
                    end
                })
                .map_or(value.len(), |(i, _)| i + 2)
        } else {
            value
                .find(|c: char| c.is_whitespace() || c == '"' || c == ',')
                .unwrap_or(value.len())
        };
        out.push_str("***");
        rest = &value[end..];
    }
    out.push_str(rest);
    out
}

fn find_ascii_case_insensitive(haystack: &str, needle: &str) -> Option<usize> {
    haystack
        .as_bytes()
        .windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::secrets;

    #[test]
    fn passwords_are_replaced() {
        assert_eq!(
            secrets("postgresql://app:s3cr%40t@10.0.0.1:5432/app"),
            "postgresql://app:***@10.0.0.1:5432/app"
        );
        assert_eq!(
            secrets("redis://:hunter2@127.0.0.1/0"),
            "redis://:***@127.0.0.1/0"
        );
        assert_eq!(
            secrets("bad \"postgres://u:p@h/db\" for key `cluster.pool_size`"),
            "bad \"postgres://u:***@h/db\" for key `cluster.pool_size`"
        );
        assert_eq!(secrets("postgresql://app@h/db"), "postgresql://app@h/db");
        assert_eq!(
            secrets("host=h user=u password=top-secret dbname=d"),
            "host=h user=u password=*** dbname=d"
        );
        assert_eq!(
            secrets("host=h PASSWORD = 'a b\\' c' dbname=d"),
            "host=h PASSWORD =*** dbname=d"
        );
    }
}
