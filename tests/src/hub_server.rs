//! A tiny HTTP/1.1 server that answers like the Hugging Face hub does for
//! hf-hub 0.5's sync API, to test downloads without a network.
//!
//! What hf-hub 0.5 (`src/api/sync.rs`) asks and needs:
//! - `GET {endpoint}/{owner}/{name}/resolve/{revision}/{file}` (the revision
//!   with `/` escaped as `%2F`), first with `Range: bytes=0-0` for the
//!   metadata: it needs `x-repo-commit` (the commit, which names the cache's
//!   snapshot folder), `x-linked-etag` or `etag` (quotes stripped; names the
//!   blob) and `content-range: bytes 0-0/{size}`. A redirect with an absolute
//!   `location` (the hub sends large LFS files to a CDN this way) is read for
//!   the commit and etag, then followed with the same range for the size.
//! - then `GET` the same url with `Range: bytes={start}-` and reads the body to
//!   the end (following redirects), so a `206` with the rest of the file.
//! - `Authorization: Bearer {token}` on every request when a token is set.
//! - 4xx/5xx become errors carrying only the status code.
//!
//! No `HEAD`, no `/api/...` calls. This server answers those requests from
//! in-memory repos, each with a commit sha, an optional required token (401
//! without it, like a gated repo) and optional LFS-style redirects; anything
//! else is a 404. Every request is recorded.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// One repo the server serves.
#[derive(Debug, Clone, Default)]
pub struct HubRepo {
    /// Sent as `x-repo-commit`; `revision` may be `main` or this.
    pub commit: String,
    /// When set, requests need `Authorization: Bearer {token}` (else 401).
    pub token: Option<String>,
    /// Serve `*.safetensors` through a redirect to `/lfs/{etag}`, as the hub
    /// does for LFS files.
    pub lfs_redirect: bool,
    /// File name (with `/` for subfolders) to contents.
    pub files: BTreeMap<String, Vec<u8>>,
}

impl HubRepo {
    /// An empty repo at `commit`.
    pub fn new(commit: &str) -> Self {
        Self {
            commit: commit.to_string(),
            ..Self::default()
        }
    }

    /// A repo holding every file under `dir`.
    pub fn from_dir(dir: &Path, commit: &str) -> io::Result<Self> {
        fn walk(root: &Path, dir: &Path, files: &mut BTreeMap<String, Vec<u8>>) -> io::Result<()> {
            for entry in std::fs::read_dir(dir)? {
                let path = entry?.path();
                if path.is_dir() {
                    walk(root, &path, files)?;
                } else {
                    let name = path
                        .strip_prefix(root)
                        .map_err(io::Error::other)?
                        .to_string_lossy()
                        .replace('\\', "/");
                    files.insert(name, std::fs::read(&path)?);
                }
            }
            Ok(())
        }
        let mut repo = Self::new(commit);
        walk(dir, dir, &mut repo.files)?;
        Ok(repo)
    }

    /// Adds or replaces a file.
    pub fn file(mut self, name: &str, contents: impl Into<Vec<u8>>) -> Self {
        self.files.insert(name.to_string(), contents.into());
        self
    }

    /// Removes a file.
    pub fn without(mut self, name: &str) -> Self {
        self.files.remove(name);
        self
    }

    /// Requires `Authorization: Bearer {token}`.
    pub fn gated(mut self, token: &str) -> Self {
        self.token = Some(token.to_string());
        self
    }

    /// Serves `*.safetensors` through redirects, like LFS files on the hub.
    pub fn lfs(mut self) -> Self {
        self.lfs_redirect = true;
        self
    }
}

/// A request the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    /// The request target as sent (still percent-encoded).
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
    pub status: u16,
}

struct State {
    repos: BTreeMap<String, HubRepo>,
    /// `/lfs/{etag}` to contents, for redirects.
    blobs: BTreeMap<String, Vec<u8>>,
    endpoint: String,
    log: Mutex<Vec<RecordedRequest>>,
}

/// The running server; stops when dropped.
pub struct HubServer {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl HubServer {
    /// Serves `repos` (repo id `owner/name` to repo) on `127.0.0.1`, any port.
    pub fn start(repos: impl IntoIterator<Item = (String, HubRepo)>) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let repos: BTreeMap<String, HubRepo> = repos.into_iter().collect();
        let blobs = repos
            .values()
            .filter(|r| r.lfs_redirect)
            .flat_map(|r| r.files.values())
            .map(|bytes| (etag(bytes), bytes.clone()))
            .collect();
        let state = Arc::new(State {
            repos,
            blobs,
            endpoint: format!("http://{addr}"),
            log: Mutex::new(Vec::new()),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let state = Arc::clone(&state);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let state = Arc::clone(&state);
                    std::thread::spawn(move || {
                        // A client that hangs up mid-request is not our concern.
                        let _ = serve_connection(stream, &state);
                    });
                }
            })
        };
        Ok(Self {
            addr,
            state,
            stop,
            accept: Some(accept),
        })
    }

    /// `http://127.0.0.1:{port}`, for `HF_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        self.state.endpoint.clone()
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// A stable, file-name-safe etag for some bytes (the hub uses sha256 for LFS
/// files and the git blob sha1 for others; hf-hub only uses it as a name).
fn etag(bytes: &[u8]) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    format!("{:016x}{:08x}", hasher.finish(), bytes.len())
}

struct Response {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

impl Response {
    fn error(status: u16, code: &str, message: &str) -> Self {
        Self {
            status,
            headers: vec![
                ("x-error-code", code.to_string()),
                ("content-type", "text/plain".to_string()),
            ],
            body: message.as_bytes().to_vec(),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        416 => "Range Not Satisfiable",
        _ => "Other",
    }
}

fn serve_connection(stream: TcpStream, state: &State) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let request_line = line.trim_end().to_string();
        if request_line.is_empty() {
            continue;
        }
        let mut headers = BTreeMap::new();
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Ok(());
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
            }
        }
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let target = parts.next().unwrap_or_default().to_string();
        let version = parts.next().unwrap_or_default();
        let close = version == "HTTP/1.0"
            || headers
                .get("connection")
                .is_some_and(|c| c.eq_ignore_ascii_case("close"));

        let response = if method == "GET" || method == "HEAD" {
            respond(state, &target, &headers)
        } else {
            Response::error(405, "MethodNotAllowed", "only GET and HEAD")
        };
        state
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(RecordedRequest {
                method: method.clone(),
                path: target,
                range: headers.get("range").cloned(),
                authorization: headers.get("authorization").cloned(),
                status: response.status,
            });

        let mut head = format!(
            "HTTP/1.1 {} {}\r\ncontent-length: {}\r\n",
            response.status,
            reason(response.status),
            response.body.len()
        );
        for (name, value) in &response.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if close {
            head.push_str("connection: close\r\n");
        }
        head.push_str("\r\n");
        writer.write_all(head.as_bytes())?;
        if method != "HEAD" {
            writer.write_all(&response.body)?;
        }
        writer.flush()?;
        if close {
            return Ok(());
        }
    }
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&hi), Some(&lo)) => hex(hi).zip(hex(lo)).map(|(h, l)| (h * 16 + l) as u8),
            _ => None,
        };
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(state: &State, target: &str, headers: &BTreeMap<String, String>) -> Response {
    let path = target.split('?').next().unwrap_or_default();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();

    if let ["lfs", blob] = segments.as_slice() {
        return match state.blobs.get(*blob) {
            Some(bytes) => ranged(bytes, headers.get("range"), Vec::new()),
            None => Response::error(404, "EntryNotFound", "no such blob"),
        };
    }
    let [owner, name, "resolve", revision, file @ ..] = segments.as_slice() else {
        return Response::error(404, "RepoNotFound", "not a resolve url");
    };
    if file.is_empty() {
        return Response::error(404, "EntryNotFound", "no file in the url");
    }
    let repo_id = format!("{}/{}", percent_decode(owner), percent_decode(name));
    let Some(repo) = state.repos.get(&repo_id) else {
        return Response::error(404, "RepoNotFound", "Repository not found");
    };
    if let Some(token) = &repo.token
        && headers.get("authorization") != Some(&format!("Bearer {token}"))
    {
        return Response::error(
            401,
            "GatedRepo",
            &format!(
                "Access to model {repo_id} is restricted. You must be authenticated to access it."
            ),
        );
    }
    let revision = percent_decode(revision);
    if revision != "main" && revision != repo.commit {
        return Response::error(404, "RevisionNotFound", "Invalid rev id");
    }
    let file = percent_decode(&file.join("/"));
    let Some(bytes) = repo.files.get(&file) else {
        let mut response = Response::error(404, "EntryNotFound", "Entry not found");
        response
            .headers
            .push(("x-repo-commit", repo.commit.clone()));
        return response;
    };
    let tag = etag(bytes);
    if repo.lfs_redirect && file.ends_with(".safetensors") {
        return Response {
            status: 302,
            headers: vec![
                ("x-repo-commit", repo.commit.clone()),
                ("x-linked-etag", format!("\"{tag}\"")),
                ("x-linked-size", bytes.len().to_string()),
                ("etag", "\"pointer-file-etag\"".to_string()),
                ("location", format!("{}/lfs/{tag}", state.endpoint)),
            ],
            body: Vec::new(),
        };
    }
    ranged(
        bytes,
        headers.get("range"),
        vec![
            ("x-repo-commit", repo.commit.clone()),
            ("etag", format!("\"{tag}\"")),
        ],
    )
}

/// The whole file (200) or `bytes=a-` / `bytes=a-b` of it (206).
fn ranged(
    bytes: &[u8],
    range: Option<&String>,
    mut headers: Vec<(&'static str, String)>,
) -> Response {
    headers.push(("accept-ranges", "bytes".to_string()));
    headers.push(("content-type", "application/octet-stream".to_string()));
    let len = bytes.len();
    let Some(spec) = range.and_then(|r| r.strip_prefix("bytes=")) else {
        return Response {
            status: 200,
            headers,
            body: bytes.to_vec(),
        };
    };
    let (start, end) = spec.split_once('-').unwrap_or((spec, ""));
    let start: usize = start.trim().parse().unwrap_or(0);
    let end: usize = end
        .trim()
        .parse()
        .map_or(len.saturating_sub(1), |e: usize| {
            e.min(len.saturating_sub(1))
        });
    if start >= len || start > end {
        headers.push(("content-range", format!("bytes */{len}")));
        return Response {
            status: 416,
            headers,
            body: Vec::new(),
        };
    }
    headers.push(("content-range", format!("bytes {start}-{end}/{len}")));
    Response {
        status: 206,
        headers,
        body: bytes[start..=end].to_vec(),
    }
}
