//! Keeping secrets (connection URL passwords) out of `Debug` output and
//! error messages.

/// `text` with the password of every connection URL in it
/// (`scheme://user:PASSWORD@host`) and every `password=...` pair of a
/// key-value connection string replaced by `***`.
pub(crate) fn secrets(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    // URLs: from each `://`, the user info up to the last `@` before the
    // end of the URL (white space or a quote). A password may hold `/`,
    // `?`, `#` and `@` (the drivers read the user info up to the `@`).
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let url_end = tail
            .find(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '`')
            .unwrap_or(tail.len());
        let url = &tail[..url_end];
        match (url.rfind('@'), url.find(':')) {
            (Some(user_end), Some(colon)) if colon < user_end => {
                out.push_str(&url[..=colon]);
                out.push_str("***");
                out.push_str(&url[user_end..]);
            }
            _ => out.push_str(url),
        }
        rest = &tail[url_end..];
    }
    out.push_str(rest);
    let out = key_value_passwords(&out, "password");
    // Redis URLs may carry it as `?pass=`.
    key_value_passwords(&out, "pass")
}

/// `KEY=VALUE` (quoted or not) becomes `KEY=***`: a value in single or
/// double quotes up to its closing quote (backslash escapes), else up to
/// white space that is not escaped.
fn key_value_passwords(text: &str, key: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = find_ascii_case_insensitive(rest, key) {
        let (head, tail) = rest.split_at(at + key.len());
        out.push_str(head);
        // Only a whole key: not `passphrase`, not `password` inside `pass`
        // matching (`password=` is redacted by the first pass already).
        let boundary_before = head[..head.len() - key.len()]
            .chars()
            .next_back()
            .is_none_or(|c| !c.is_ascii_alphanumeric() && c != '_');
        let trimmed = tail.trim_start();
        let Some(value) = trimmed.strip_prefix('=').filter(|_| boundary_before) else {
            rest = tail;
            continue;
        };
        out.push_str(&tail[..tail.len() - trimmed.len()]);
        out.push('=');
        let value = value.trim_start();
        let end = match value.chars().next() {
            Some(quote @ ('\'' | '"')) => {
                let mut escaped = false;
                value[1..]
                    .char_indices()
                    .find(|&(_, c)| {
                        let end = c == quote && !escaped;
                        escaped = c == '\\' && !escaped;
                        end
                    })
                    .map_or(value.len(), |(i, _)| i + 2)
            }
            _ => {
                let mut escaped = false;
                value
                    .char_indices()
                    .find(|&(_, c)| {
                        let end = c.is_whitespace() && !escaped;
                        escaped = c == '\\' && !escaped;
                        end
                    })
                    .map_or(value.len(), |(i, _)| i)
            }
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
        // Passwords with URL delimiters, commas, escapes and quotes.
        for (text, secret) in [
            ("postgresql://app:pa/ss@h/db", "pa/ss"),
            ("postgresql://app:a?b#c@h:5432/db", "a?b#c"),
            ("postgresql://app:p@ss@h/db", "p@ss"),
            ("postgresql:///db?password=x1y2&host=h", "x1y2"),
            ("host=h password=ab,cd dbname=d", "ab,cd"),
            ("host=h password=ab\\ cd dbname=d", "cd"),
            ("password = \"qu oted\"", "qu oted"),
            ("unix:///run/redis.sock?pass=hunter2", "hunter2"),
            ("redis://:hunter2@127.0.0.1:6379/0", "hunter2"),
        ] {
            let shown = secrets(text);
            assert!(!shown.contains(secret), "{text} -> {shown}");
            assert!(shown.contains("***"), "{text} -> {shown}");
        }
        // Ordinary text is left alone.
        for text in [
            "invalid type: string \"many\", expected an integer for key `cluster.pool_size`",
            "the passphrase is not a password field",
            "see https://example.com/docs?a=1#x",
        ] {
            assert_eq!(secrets(text), text);
        }
    }
}
