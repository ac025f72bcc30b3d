//! The upstream list: the `--upstream` flags and the `--upstreams-file`,
//! applied to the balancer's [`Upstreams`] at start and again on each
//! `SIGHUP`.

use std::path::{Path, PathBuf};

use hyper::Uri;
use tokio::signal::unix::Signal;
use tower_scale::balance::{SetOutcome, Upstreams};

/// Parses one `--upstream` value (the balancer checks the rest: `http://`,
/// a host, no path, no credentials).
pub fn parse_url(value: &str) -> Result<Uri, String> {
    value
        .parse::<Uri>()
        .map_err(|e| format!("--upstream {value:?}: {e}"))
}

/// Where the upstreams come from.
pub struct List {
    /// `--upstream`: always in the set.
    fixed: Vec<Uri>,
    /// `--upstreams-file`: read at start and on each `SIGHUP`.
    file: Option<PathBuf>,
}

impl List {
    pub fn new(fixed: Vec<Uri>, file: Option<PathBuf>) -> Self {
        Self { fixed, file }
    }

    pub fn has_file(&self) -> bool {
        self.file.is_some()
    }

    /// Makes `set` exactly the `--upstream` flags and the file's lines.
    /// Nothing changes when the file cannot be read, holds a bad address,
    /// or the list would be empty.
    pub fn apply(&self, set: &Upstreams) -> Result<SetOutcome, String> {
        let mut urls = self.fixed.clone();
        if let Some(path) = &self.file {
            urls.extend(read(path)?);
        }
        if urls.is_empty() {
            let path = self.file.as_deref().unwrap_or(Path::new(""));
            return Err(format!(
                "--upstreams-file {}: no upstream listed (and no --upstream)",
                path.display()
            ));
        }
        set.set(urls).map_err(|e| e.to_string())
    }
}

/// The largest upstreams file read.
const MAX_FILE: u64 = 1 << 20;

/// The file's addresses: one `http://HOST:PORT` a line; blank lines and
/// what follows a `#` are ignored. Refused: anything but a regular file
/// (a FIFO would block the reload), a file over 1 MiB, and an empty one
/// (0 bytes: a file caught while it is being rewritten; a list meant to be
/// empty says so with a comment line). Replace the file by renaming a
/// complete one over it, and a reload never sees half of it.
fn read(path: &Path) -> Result<Vec<Uri>, String> {
    let fail = |e: &dyn std::fmt::Display| format!("--upstreams-file {}: {e}", path.display());
    // Before opening: opening a FIFO blocks until a writer comes.
    let meta = std::fs::metadata(path).map_err(|e| fail(&e))?;
    if !meta.is_file() {
        return Err(fail(&"not a regular file"));
    }
    let file = std::fs::File::open(path).map_err(|e| fail(&e))?;
    let meta = file.metadata().map_err(|e| fail(&e))?;
    if !meta.is_file() {
        return Err(fail(&"not a regular file"));
    }
    if meta.len() > MAX_FILE {
        return Err(fail(&format_args!("over {MAX_FILE} bytes")));
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_FILE + 1), &mut text)
        .map_err(|e| fail(&e))?;
    if text.is_empty() {
        return Err(fail(
            &"empty (being written?); a list of none needs a comment line",
        ));
    }
    if text.len() as u64 > MAX_FILE {
        return Err(fail(&format_args!("over {MAX_FILE} bytes")));
    }
    let mut urls = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let url = line.parse::<Uri>().map_err(|e| {
            format!(
                "--upstreams-file {}, line {}: {line:?}: {e}",
                path.display(),
                i + 1
            )
        })?;
        urls.push(url);
    }
    Ok(urls)
}

/// Reloads the list on each `SIGHUP`, saying on stderr what changed or why
/// the file was refused (the current list then stays).
pub async fn reload_on_hangup(mut hangups: Signal, list: List, set: Upstreams) {
    while hangups.recv().await.is_some() {
        match list.apply(&set) {
            Ok(changed) => {
                let show = |urls: &[Uri]| {
                    urls.iter()
                        .map(|u| u.to_string().trim_end_matches('/').to_string())
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                eprintln!(
                    "http_proxy: upstreams reloaded: added [{}], removed [{}]; {} in all",
                    show(&changed.added),
                    show(&changed.removed),
                    set.len()
                );
            }
            Err(e) => eprintln!(
                "http_proxy: upstreams not reloaded, keeping the {} current: {e}",
                set.len()
            ),
        }
    }
}
