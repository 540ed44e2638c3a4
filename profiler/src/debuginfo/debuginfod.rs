//! A debuginfod client: `GET URL/buildid/ID/debuginfo` from each server
//! in turn (`--debuginfod URL`, else `DEBUGINFOD_URLS`), for modules that
//! are stripped and have no debug info on the machine.
//!
//! Downloads never hold a snapshot: [`Client::request`] hands the build id
//! to a thread of its own (a current-thread runtime, hyper with rustls, as
//! the agent's pusher) and returns at once; a snapshot waits for what is
//! under way at most its budget ([`SNAPSHOT_WAIT`]), and frames of a module
//! still downloading (or that could not be) stay unresolved, their mapping
//! says why. Each file is downloaded once into the cache directory
//! (`ID/debuginfo`), through a temporary file renamed into place once its
//! build id proved right, at most [`MAX_DOWNLOAD_BYTES`]; a failure is
//! remembered for [`RETRY_AFTER`].
use std::{
    collections::HashMap,
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{header::USER_AGENT, Uri};

use crate::{
    agent::push::innermost,
    error::{Error, Result},
};

/// Connecting to a server may take this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A whole download (answer and body) may take this long.
pub const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Larger debug files are not downloaded.
pub const MAX_DOWNLOAD_BYTES: u64 = 1 << 30;
/// A failed lookup is tried again after this long.
pub const RETRY_AFTER: Duration = Duration::from_secs(300);
/// How long a snapshot waits, all modules together, for downloads under way.
pub const SNAPSHOT_WAIT: Duration = Duration::from_secs(2);

/// Which servers, and where their files are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Base URLs, without a trailing `/`.
    pub urls: Vec<String>,
    pub cache_dir: PathBuf,
}

/// The servers of `--debuginfod` (checked: bad input names the flag), else
/// of `DEBUGINFOD_URLS` (space-separated, as elfutils reads it; what is not
/// an http(s) URL there is skipped with a warning).
pub fn urls(flags: &[String], env: Option<&str>) -> Result<Vec<String>> {
    if !flags.is_empty() {
        return flags
            .iter()
            .map(|u| crate::agent::push::parse_url("--debuginfod", u).map_err(Error::BadInput))
            .collect();
    }
    Ok(env
        .unwrap_or("")
        .split_whitespace()
        .filter_map(
            |u| match crate::agent::push::parse_url("DEBUGINFOD_URLS", u) {
                Ok(u) => Some(u),
                Err(e) => {
                    tracing::warn!("{e}; skipped");
                    None
                }
            },
        )
        .collect())
}

/// The cache of `attach`, `run` and `top`: `$XDG_CACHE_HOME/heapbpf/debuginfod`,
/// else `$HOME/.cache/heapbpf/debuginfod` (the agent's is in its data dir).
pub fn user_cache_dir(xdg_cache_home: Option<&str>, home: Option<&str>) -> PathBuf {
    match (xdg_cache_home.filter(|d| d.starts_with('/')), home) {
        (Some(x), _) => Path::new(x).join("heapbpf/debuginfod"),
        (None, Some(h)) if !h.is_empty() => Path::new(h).join(".cache/heapbpf/debuginfod"),
        _ => PathBuf::from("/var/cache/heapbpf/debuginfod"),
    }
}

/// A lookup's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fetch {
    Pending,
    /// The downloaded (or cached) debug file.
    Ready(PathBuf),
    /// Why not, until it is tried again.
    Failed(String),
}

enum Entry {
    Pending,
    Ready(PathBuf),
    Failed { why: String, retry_at: Instant },
}

type State = Arc<(Mutex<HashMap<String, Entry>>, Condvar)>;

/// Downloads debug files by build id; cheap to share.
pub struct Client {
    cfg: Config,
    state: State,
    jobs: tokio::sync::mpsc::UnboundedSender<String>,
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Empty<Bytes>,
>;

impl Client {
    /// Starts the download thread; `None` without servers.
    pub fn start(cfg: Config) -> Result<Option<Client>> {
        if cfg.urls.is_empty() {
            return Ok(None);
        }
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| Error::Runtime(format!("cannot set up TLS for debuginfod: {e}")))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client: HttpClient =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(https);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::runtime("cannot start the debuginfod client's runtime", e))?;
        let (jobs, mut inbox) = tokio::sync::mpsc::unbounded_channel::<String>();
        let state: State = Arc::default();
        let (thread_state, thread_cfg) = (state.clone(), cfg.clone());
        std::thread::Builder::new()
            .name("heapbpf-debuginfod".into())
            .spawn(move || {
                runtime.block_on(async move {
                    while let Some(id) = inbox.recv().await {
                        let (client, cfg, state) =
                            (client.clone(), thread_cfg.clone(), thread_state.clone());
                        tokio::spawn(async move {
                            let result = download(&client, &cfg, &id).await;
                            let entry = match result {
                                Ok(path) => {
                                    tracing::info!(build_id = %id, path = %path.display(), "debug info downloaded");
                                    Entry::Ready(path)
                                }
                                Err(why) => {
                                    tracing::info!(build_id = %id, why, "no debug info from debuginfod");
                                    Entry::Failed {
                                        why,
                                        retry_at: Instant::now() + RETRY_AFTER,
                                    }
                                }
                            };
                            let (lock, cv) = &*state;
                            lock.lock().unwrap_or_else(|p| p.into_inner()).insert(id, entry);
                            cv.notify_all();
                        });
                    }
                })
            })
            .map_err(|e| Error::runtime("cannot start the debuginfod client", e))?;
        Ok(Some(Client { cfg, state, jobs }))
    }

    /// The servers, for people (`URL URL`).
    pub fn servers(&self) -> String {
        self.cfg.urls.join(" ")
    }

    /// The state of `build_id`'s debug file, starting its download unless it
    /// is cached, under way, or failed less than [`RETRY_AFTER`] ago.
    pub fn request(&self, build_id: &str) -> Fetch {
        if !is_build_id(build_id) {
            return Fetch::Failed(format!("{build_id:?} is not a build id"));
        }
        let (lock, _) = &*self.state;
        let mut map = lock.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(build_id) {
            Some(Entry::Pending) => return Fetch::Pending,
            Some(Entry::Ready(p)) => return Fetch::Ready(p.clone()),
            Some(Entry::Failed { why, retry_at }) if Instant::now() < *retry_at => {
                return Fetch::Failed(why.clone())
            }
            _ => {}
        }
        let cached = cache_path(&self.cfg.cache_dir, build_id);
        if std::fs::symlink_metadata(&cached).is_ok_and(|m| m.is_file()) {
            map.insert(build_id.to_string(), Entry::Ready(cached.clone()));
            return Fetch::Ready(cached);
        }
        if self.jobs.send(build_id.to_string()).is_err() {
            return Fetch::Failed("the debuginfod client stopped".into());
        }
        map.insert(build_id.to_string(), Entry::Pending);
        Fetch::Pending
    }

    /// Waits until `deadline` for a download under way to end.
    pub fn wait(&self, build_id: &str, deadline: Instant) -> Fetch {
        let (lock, cv) = &*self.state;
        let mut map = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match map.get(build_id) {
                Some(Entry::Ready(p)) => return Fetch::Ready(p.clone()),
                Some(Entry::Failed { why, .. }) => return Fetch::Failed(why.clone()),
                Some(Entry::Pending) => {}
                None => return Fetch::Failed("never asked for".into()),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Fetch::Pending;
            }
            map = cv
                .wait_timeout(map, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

fn is_build_id(id: &str) -> bool {
    id.len() >= 4 && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Where a build id's debug file is kept (elfutils' layout).
pub fn cache_path(cache_dir: &Path, build_id: &str) -> PathBuf {
    cache_dir.join(build_id).join("debuginfo")
}

/// Tries each server in turn; the first that has the file wins.
async fn download(
    client: &HttpClient,
    cfg: &Config,
    build_id: &str,
) -> std::result::Result<PathBuf, String> {
    let mut why = Vec::new();
    for url in &cfg.urls {
        match tokio::time::timeout(DOWNLOAD_TIMEOUT, download_from(client, cfg, url, build_id))
            .await
        {
            Ok(Ok(path)) => return Ok(path),
            Ok(Err(e)) => why.push(format!("{url}: {e}")),
            Err(_) => why.push(format!(
                "{url}: no complete answer within {}",
                humantime::format_duration(DOWNLOAD_TIMEOUT)
            )),
        }
    }
    Err(why.join("; "))
}

async fn download_from(
    client: &HttpClient,
    cfg: &Config,
    url: &str,
    build_id: &str,
) -> std::result::Result<PathBuf, String> {
    let uri: Uri = format!("{url}/buildid/{build_id}/debuginfo")
        .parse()
        .map_err(|_| "not a URL once /buildid/ID/debuginfo is added".to_string())?;
    let req = hyper::Request::get(uri)
        .header(USER_AGENT, concat!("heapbpf/", env!("CARGO_PKG_VERSION")))
        .body(Empty::new())
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let resp = client.request(req).await.map_err(|e| innermost(&e))?;
    let status = resp.status();
    if status == hyper::StatusCode::NOT_FOUND {
        return Err("not found".into());
    }
    if !status.is_success() {
        return Err(format!("answered {status}"));
    }
    let announced = resp
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_DOWNLOAD_BYTES) {
        return Err(too_big());
    }
    let dir = cfg.cache_dir.join(build_id);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    static TEMPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let temp = dir.join(format!(
        ".debuginfo.{}.{}",
        std::process::id(),
        TEMPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let result = async {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temp)
            .map_err(|e| format!("cannot write {}: {e}", temp.display()))?;
        let mut body = resp.into_body();
        let mut written = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| innermost(&e))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            written += data.len() as u64;
            if written > MAX_DOWNLOAD_BYTES {
                return Err(too_big());
            }
            file.write_all(&data)
                .map_err(|e| format!("cannot write {}: {e}", temp.display()))?;
        }
        file.sync_all()
            .map_err(|e| format!("cannot write {}: {e}", temp.display()))?;
        // Only the module's own debug info is kept.
        let facts = super::ElfFacts::read(&file).ok_or("the answer is not an ELF file")?;
        if facts.build_id.as_deref() != Some(build_id) {
            return Err(format!(
                "the answer has build id {}",
                facts.build_id.as_deref().unwrap_or("none")
            ));
        }
        let done = cache_path(&cfg.cache_dir, build_id);
        std::fs::rename(&temp, &done)
            .map_err(|e| format!("cannot rename into {}: {e}", done.display()))?;
        Ok(done)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

fn too_big() -> String {
    format!(
        "larger than {}, the most heapbpf downloads",
        crate::units::size_label(MAX_DOWNLOAD_BYTES)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_come_from_the_flag_else_the_environment() {
        let flags = vec!["http://127.0.0.1:8002/".to_string()];
        assert_eq!(
            urls(&flags, Some("https://ignored")).unwrap(),
            vec!["http://127.0.0.1:8002"]
        );
        assert_eq!(
            urls(
                &[],
                Some("  https://debuginfod.debian.net  file:///x http://a:1 ")
            )
            .unwrap(),
            vec!["https://debuginfod.debian.net", "http://a:1"]
        );
        assert!(urls(&[], None).unwrap().is_empty());
        let e = urls(&["ftp://x".into()], None).unwrap_err().to_string();
        assert!(e.contains("--debuginfod ftp://x"), "{e}");
    }

    #[test]
    fn the_cache_follows_xdg() {
        assert_eq!(
            user_cache_dir(Some("/c"), Some("/home/u")),
            PathBuf::from("/c/heapbpf/debuginfod")
        );
        // A relative XDG_CACHE_HOME is ignored, as the spec says.
        assert_eq!(
            user_cache_dir(Some("c"), Some("/home/u")),
            PathBuf::from("/home/u/.cache/heapbpf/debuginfod")
        );
        assert_eq!(
            cache_path(Path::new("/c"), "abcd"),
            PathBuf::from("/c/abcd/debuginfo")
        );
        assert!(is_build_id("93ac61ec5a8eb1396f9fbd350e3169a558528a40"));
        assert!(!is_build_id("../../etc"));
    }

    #[test]
    fn a_dead_server_fails_fast_and_is_remembered() {
        // A port nothing listens on: connection refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("heapbpf-dfd-{}", std::process::id()));
        let client = Client::start(Config {
            urls: vec![format!("http://127.0.0.1:{port}")],
            cache_dir: dir.clone(),
        })
        .unwrap()
        .unwrap();
        let id = "00112233445566778899aabbccddeeff00112233";
        assert_eq!(client.request(id), Fetch::Pending);
        let t = Instant::now();
        let got = client.wait(id, Instant::now() + Duration::from_secs(10));
        assert!(t.elapsed() < CONNECT_TIMEOUT + Duration::from_secs(1));
        let Fetch::Failed(why) = got else {
            panic!("{got:?}")
        };
        assert!(why.contains(&format!("127.0.0.1:{port}")), "{why}");
        // Remembered: not asked again before RETRY_AFTER.
        assert_eq!(client.request(id), Fetch::Failed(why));
        assert!(!cache_path(&dir, id).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
