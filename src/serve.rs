//! `symb serve`: an output folder and its playground page over HTTP on
//! 127.0.0.1, with the cross-origin isolation headers (COOP/COEP) that
//! multithreaded WebAssembly needs.
//!
//! With a local transformers.js (`--transformers-js`, a `node_modules`
//! folder holding `@huggingface/transformers` and `onnxruntime-web`), the
//! page loads the library and ONNX Runtime's WebAssembly from this server and
//! nothing leaves the machine; without, from the URL the page names (a CDN).

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Where the page finds transformers.js when the server has a local copy.
pub const LOCAL_CONFIG: &str = "/_symb/transformers.json";
/// Where a page posts what it measured, when the server has an inbox
/// (`POST /_symb/inbox/NAME`; the browser check's pages).
pub const INBOX: &str = "/_symb/inbox/";
/// The largest body the inbox takes (logits along a few prompts).
const MAX_INBOX_BODY: u64 = 1 << 30;

/// Where posted bodies go: (name, body).
pub type Inbox = std::sync::mpsc::Sender<(String, Vec<u8>)>;

/// The longest request or header line accepted (bytes).
const MAX_LINE: u64 = 8 * 1024;
/// The most header lines in one request.
const MAX_HEADERS: usize = 100;
/// The largest request body drained (GET and HEAD carry none in practice).
const MAX_BODY: u64 = 1 << 20;
/// Connections served at once; past this, new ones get 503 at once.
const MAX_CONNECTIONS: usize = 64;
/// How long a connection may sit idle mid-request (or between requests).
const READ_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a whole request head may take, however slowly it trickles in.
const HEAD_DEADLINE: Duration = Duration::from_secs(30);
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Server {
    listener: TcpListener,
    /// The served folders, symlinks resolved: nothing outside them is served.
    roots: Arc<Roots>,
}

struct Roots {
    folder: PathBuf,
    /// A `node_modules` folder with transformers.js and onnxruntime-web.
    modules: Option<PathBuf>,
    /// [`HEAD_DEADLINE`] (shorter in tests).
    head_deadline: Duration,
    /// Where posted bodies go, by name (see [`INBOX`]).
    inbox: Option<std::sync::Mutex<Inbox>>,
    /// Each served file's ETag (its blake3), by (device, inode), with the
    /// stat it was computed for: a file is hashed once until it changes.
    tags: std::sync::Mutex<std::collections::HashMap<(u64, u64), (FileStat, String)>>,
}

/// What says a file is still the one that was hashed.
#[derive(Clone, Copy, PartialEq, Eq)]
struct FileStat {
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Roots {
    /// A strong validator for the open file: its blake3 in quotes (so two
    /// builds' files never share one, whatever their times), and its
    /// modification time as an HTTP date.
    fn validators(&self, file: &mut std::fs::File) -> std::io::Result<(String, String)> {
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata()?;
        let stat = FileStat {
            len: meta.len(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
        };
        let modified = httpdate::fmt_http_date(meta.modified()?);
        let key = (meta.dev(), meta.ino());
        if let Some((known, tag)) = self.tags.lock().expect("tags lock").get(&key)
            && *known == stat
        {
            return Ok((tag.clone(), modified));
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(&mut *file)?;
        file.seek(SeekFrom::Start(0))?;
        let tag = format!("\"{}\"", hasher.finalize().to_hex());
        self.tags
            .lock()
            .expect("tags lock")
            .insert(key, (stat, tag.clone()));
        Ok((tag, modified))
    }
}

/// The connection as the request parser reads it: each read fails once the
/// deadline for the current request head has passed, so a client sending a
/// byte just inside the read timeout cannot hold a connection for ever.
struct Deadline {
    stream: TcpStream,
    until: Option<std::time::Instant>,
}

impl Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(until) = self.until {
            let left = until
                .checked_duration_since(std::time::Instant::now())
                .filter(|d| !d.is_zero())
                .ok_or(std::io::ErrorKind::TimedOut)?;
            self.stream.set_read_timeout(Some(left.min(READ_TIMEOUT)))?;
        }
        self.stream.read(buf)
    }
}

impl Server {
    /// Binds 127.0.0.1:`port` (0: any free port).
    pub fn bind(root: &Path, port: u16, modules: Option<&Path>) -> std::io::Result<Self> {
        if let Some(m) = modules {
            let lib = m.join("@huggingface/transformers/dist/transformers.min.js");
            if !lib.is_file() {
                return Err(std::io::Error::other(format!(
                    "`{}` has no @huggingface/transformers/dist/transformers.min.js (give the \
                        node_modules folder of `npm install @huggingface/transformers`)",
                    m.display()
                )));
            }
        }
        let roots = Roots {
            folder: root.canonicalize()?,
            modules: modules.map(Path::canonicalize).transpose()?,
            head_deadline: HEAD_DEADLINE,
            inbox: None,
            tags: Default::default(),
        };
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        Ok(Server {
            listener,
            roots: Arc::new(roots),
        })
    }

    /// Takes what pages post to [`INBOX`]`NAME`: (NAME, body) on `inbox`.
    pub fn with_inbox(mut self, inbox: Inbox) -> Self {
        Arc::get_mut(&mut self.roots)
            .expect("not yet serving")
            .inbox = Some(std::sync::Mutex::new(inbox));
        self
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.listener.local_addr().expect("bound"))
    }

    /// Serves until the process ends, one thread per connection, at most
    /// [`MAX_CONNECTIONS`] at once.
    pub fn run(self) -> std::io::Result<()> {
        self.serve(&std::sync::atomic::AtomicBool::new(false))
    }

    /// Serves on a thread of its own until the handle is dropped.
    pub fn spawn(self) -> Serving {
        let (url, address) = (self.url(), self.listener.local_addr().expect("bound"));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let _ = self.serve(&flag);
        });
        Serving {
            url,
            address,
            stop,
            thread: Some(thread),
        }
    }

    fn serve(self, stop: &std::sync::atomic::AtomicBool) -> std::io::Result<()> {
        let open = Arc::new(AtomicUsize::new(0));
        for stream in self.listener.incoming() {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let Ok(mut stream) = stream else { continue };
            if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                open.fetch_sub(1, Ordering::SeqCst);
                let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                let _ = stream.write_all(&head(
                    "503 Service Unavailable",
                    "text/plain",
                    0,
                    false,
                    &[],
                ));
                continue;
            }
            let (roots, open) = (self.roots.clone(), open.clone());
            std::thread::spawn(move || {
                let _ = handle(stream, &roots);
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
        Ok(())
    }
}

/// A server running on its own thread ([`Server::spawn`]); dropped, it stops
/// taking connections.
pub struct Serving {
    pub url: String,
    address: std::net::SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // The accept loop wakes for one more connection, and sees the flag.
        let _ = TcpStream::connect_timeout(&self.address, Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" => "application/json",
        "wasm" => "application/wasm",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// `request` (a URL path) as a file under `root` (a real path), refusing
/// anything that leaves it, by `..` or through a symlink.
fn resolve(root: &Path, request: &str) -> Option<PathBuf> {
    let path = request.split(['?', '#']).next().unwrap_or("");
    let decoded = percent_decode(path)?;
    let mut out = root.to_path_buf();
    for component in Path::new(decoded.trim_start_matches('/')).components() {
        match component {
            Component::Normal(c) => out.push(c),
            Component::CurDir => {}
            _ => return None,
        }
    }
    if out.is_dir() {
        out.push("index.html");
    }
    let real = out.canonicalize().ok()?;
    real.starts_with(root).then_some(real)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// What [`read_line`] read.
enum Line {
    Text(String),
    /// The stream ended.
    End,
    /// Longer than [`MAX_LINE`] (or cut short by the peer).
    TooLong,
}

/// One line of at most [`MAX_LINE`] bytes.
fn read_line(reader: &mut impl BufRead) -> std::io::Result<Line> {
    let mut line = Vec::new();
    let n = reader.take(MAX_LINE).read_until(b'\n', &mut line)?;
    Ok(match n {
        0 => Line::End,
        _ if !line.ends_with(b"\n") => Line::TooLong,
        _ => Line::Text(String::from_utf8_lossy(&line).trim_end().to_string()),
    })
}

/// A parsed request head.
struct Request {
    method: String,
    target: String,
    keep_alive: bool,
    range: Option<String>,
    /// `If-Range`: the range applies only while the file has this ETag (or date).
    if_range: Option<String>,
    /// `If-None-Match`: the ETags the client holds.
    if_none_match: Option<String>,
    /// The body, where the server keeps it (posts to its inbox).
    body: Vec<u8>,
}

/// Why a request is answered with an error and the connection closed.
enum BadRequest {
    /// A line over [`MAX_LINE`] or more than [`MAX_HEADERS`] headers.
    TooLarge,
    /// A body over [`MAX_BODY`].
    BodyTooLarge,
    /// A malformed line or Content-Length, or a body we do not take.
    Malformed(&'static str),
}

/// A request: its head, and its body when `keep_body` says the target's is
/// wanted (up to [`MAX_INBOX_BODY`]; others are drained, up to [`MAX_BODY`]).
fn read_request(
    reader: &mut impl BufRead,
    keep_body: &dyn Fn(&str, &str) -> bool,
) -> std::io::Result<Option<Result<Request, BadRequest>>> {
    let line = match read_line(reader)? {
        Line::Text(line) => line,
        Line::End => return Ok(None),
        Line::TooLong => return Ok(Some(Err(BadRequest::TooLarge))),
    };
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Ok(Some(Err(BadRequest::Malformed("malformed request line"))));
    };
    let mut request = Request {
        method: method.to_string(),
        target: target.to_string(),
        keep_alive: version == "HTTP/1.1",
        range: None,
        if_range: None,
        if_none_match: None,
        body: Vec::new(),
    };
    let keep = keep_body(method, target);
    let max_body = if keep { MAX_INBOX_BODY } else { MAX_BODY };
    let mut length: Option<u64> = None;
    for count in 0.. {
        let header = match read_line(reader)? {
            Line::Text(header) => header,
            Line::End => return Ok(None),
            Line::TooLong => return Ok(Some(Err(BadRequest::TooLarge))),
        };
        if header.is_empty() {
            break;
        }
        if count >= MAX_HEADERS {
            return Ok(Some(Err(BadRequest::TooLarge)));
        }
        let Some((name, value)) = header.split_once(':') else {
            return Ok(Some(Err(BadRequest::Malformed("malformed header line"))));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "connection" if value.eq_ignore_ascii_case("close") => request.keep_alive = false,
            "connection" if value.eq_ignore_ascii_case("keep-alive") => request.keep_alive = true,
            // RFC 9112 §6.3: digits only (no sign), and several values
            // (headers or a list) only when they are the same.
            "content-length" => {
                let mut values = value.split(',').map(|v| digits(v.trim()));
                let first = match values.next() {
                    Some(Ok(n)) => n,
                    _ => return Ok(Some(Err(BadRequest::Malformed("invalid Content-Length")))),
                };
                if values.any(|v| v != Ok(first)) || length.is_some_and(|l| l != first) {
                    return Ok(Some(Err(BadRequest::Malformed(
                        "conflicting Content-Length values",
                    ))));
                }
                if first > max_body {
                    return Ok(Some(Err(BadRequest::BodyTooLarge)));
                }
                length = Some(first);
            }
            "transfer-encoding" => {
                return Ok(Some(Err(BadRequest::Malformed(
                    "request bodies are not accepted",
                ))));
            }
            "range" => request.range = Some(value.to_string()),
            "if-range" => request.if_range = Some(value.to_string()),
            "if-none-match" => request.if_none_match = Some(value.to_string()),
            _ => {}
        }
    }
    let length = length.unwrap_or(0);
    if keep {
        reader.take(length).read_to_end(&mut request.body)?;
        if (request.body.len() as u64) < length {
            return Ok(None);
        }
    } else if length > 0 {
        std::io::copy(&mut reader.take(length), &mut std::io::sink())?;
    }
    Ok(Some(Ok(request)))
}

/// A single byte range of a `len`-byte file, as `(first, last)` inclusive;
/// `Ok(None)` when the header is ignored (not bytes, or several ranges: the
/// whole file is sent), `Err(())` when unsatisfiable.
fn byte_range(header: &str, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (first, last) = (first.trim(), last.trim());
    let range = if first.is_empty() {
        let suffix = digits(last)?;
        if suffix == 0 || len == 0 {
            return Err(());
        }
        (len.saturating_sub(suffix), len - 1)
    } else {
        let first = digits(first)?;
        // A last position past the end (however large) means the end.
        let last = if last.is_empty() {
            len.saturating_sub(1)
        } else {
            digits(last)?.min(len.saturating_sub(1))
        };
        if first >= len || last < first {
            return Err(());
        }
        (first, last)
    };
    Ok(Some(range))
}

/// A decimal number of ASCII digits only (no sign, no space); past
/// `u64::MAX` it is `u64::MAX`.
fn digits(text: &str) -> Result<u64, ()> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(());
    }
    Ok(text.bytes().fold(0u64, |n, b| {
        n.saturating_mul(10).saturating_add(u64::from(b - b'0'))
    }))
}

/// Whether an `If-None-Match` list names `tag` (weak comparison, as RFC
/// 9110 §13.1.2 asks), or is `*`.
fn none_match_hits(header: &str, tag: &str) -> bool {
    header.trim() == "*"
        || header
            .split(',')
            .any(|t| t.trim().trim_start_matches("W/") == tag)
}

fn head(status: &str, kind: &str, length: u64, keep_alive: bool, extra: &[String]) -> Vec<u8> {
    let mut text = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: \
            {length}\r\nCross-Origin-Opener-Policy: same-origin\r\nCross-Origin-Embedder-Policy: \
            require-corp\r\nCross-Origin-Resource-Policy: same-origin\r\nCache-Control: \
            no-store\r\nConnection: {}\r\n",
        if keep_alive { "keep-alive" } else { "close" }
    );
    for line in extra {
        text.push_str(line);
        text.push_str("\r\n");
    }
    text.push_str("\r\n");
    text.into_bytes()
}

fn handle(stream: TcpStream, roots: &Roots) -> std::io::Result<()> {
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut reader = BufReader::new(Deadline {
        stream: stream.try_clone()?,
        until: None,
    });
    let mut stream = stream;
    loop {
        reader.get_mut().until = Some(std::time::Instant::now() + roots.head_deadline);
        let keep_body = |method: &str, target: &str| {
            roots.inbox.is_some() && method == "POST" && target.starts_with(INBOX)
        };
        let request = match read_request(&mut reader, &keep_body)? {
            None => return Ok(()),
            Some(Ok(request)) => request,
            Some(Err(bad)) => {
                let (status, text) = match bad {
                    BadRequest::TooLarge => {
                        ("431 Request Header Fields Too Large", "request too large\n")
                    }
                    BadRequest::BodyTooLarge => {
                        ("413 Content Too Large", "request body too large\n")
                    }
                    BadRequest::Malformed(why) => ("400 Bad Request", why),
                };
                stream.write_all(&head(status, "text/plain", text.len() as u64, false, &[]))?;
                stream.write_all(text.as_bytes())?;
                return stream.flush();
            }
        };
        let keep_alive = request.keep_alive;
        let send_body = request.method != "HEAD";
        let (status, body, kind, extra): (&str, Body, &str, Vec<String>) =
            if let (Some(inbox), Some(name)) = (
                roots.inbox.as_ref().filter(|_| request.method == "POST"),
                request.target.strip_prefix(INBOX),
            ) {
                let _ = inbox
                    .lock()
                    .expect("inbox lock")
                    .send((name.to_string(), request.body));
                (
                    "204 No Content",
                    Body::Bytes(Vec::new()),
                    "text/plain",
                    Vec::new(),
                )
            } else if request.method != "GET" && request.method != "HEAD" {
                (
                    "405 Method Not Allowed",
                    Body::Bytes(b"only GET and HEAD\n".to_vec()),
                    "text/plain",
                    vec!["Allow: GET, HEAD".into()],
                )
            } else {
                match respond(&request.target, roots) {
                    None => (
                        "404 Not Found",
                        Body::Bytes(b"not found\n".to_vec()),
                        "text/plain",
                        Vec::new(),
                    ),
                    Some((Body::File(mut file, len), kind)) => {
                        let (tag, modified) = roots.validators(&mut file)?;
                        let mut headers = vec![
                            "Accept-Ranges: bytes".to_string(),
                            format!("ETag: {tag}"),
                            format!("Last-Modified: {modified}"),
                        ];
                        // A range of another version of the file (a rebuild
                        // between two requests) is never joined to this one:
                        // with `If-Range` that does not match, the whole file.
                        let range = request.range.as_deref().filter(|_| {
                            request
                                .if_range
                                .as_deref()
                                .is_none_or(|v| v.trim() == tag || v.trim() == modified)
                        });
                        if request
                            .if_none_match
                            .as_deref()
                            .is_some_and(|h| none_match_hits(h, &tag))
                        {
                            ("304 Not Modified", Body::Empty(len), kind, headers)
                        } else {
                            match range.map_or(Ok(None), |r| byte_range(r, len)) {
                                Ok(None) => ("200 OK", Body::File(file, len), kind, headers),
                                Ok(Some((first, last))) => {
                                    file.seek(SeekFrom::Start(first))?;
                                    headers
                                        .push(format!("Content-Range: bytes {first}-{last}/{len}"));
                                    (
                                        "206 Partial Content",
                                        Body::File(file, last - first + 1),
                                        kind,
                                        headers,
                                    )
                                }
                                Err(()) => (
                                    "416 Range Not Satisfiable",
                                    Body::Bytes(Vec::new()),
                                    "text/plain",
                                    vec![format!("Content-Range: bytes */{len}")],
                                ),
                            }
                        }
                    }
                    Some((body, kind)) => ("200 OK", body, kind, Vec::new()),
                }
            };
        stream.write_all(&head(status, kind, body.len(), keep_alive, &extra))?;
        if send_body {
            match body {
                Body::Bytes(bytes) => stream.write_all(&bytes)?,
                Body::File(file, len) => {
                    std::io::copy(&mut file.take(len), &mut stream)?;
                }
                Body::Empty(_) => {}
            }
        }
        stream.flush()?;
        if !keep_alive {
            return Ok(());
        }
    }
}

enum Body {
    Bytes(Vec<u8>),
    File(std::fs::File, u64),
    /// No body (304): the length the file's answer would have.
    Empty(u64),
}

impl Body {
    fn len(&self) -> u64 {
        match self {
            Body::Bytes(b) => b.len() as u64,
            Body::File(_, n) | Body::Empty(n) => *n,
        }
    }

    fn file(path: &Path) -> Option<(Body, &'static str)> {
        let file = std::fs::File::open(path).ok()?;
        let len = file.metadata().ok().filter(|m| m.is_file())?.len();
        Some((Body::File(file, len), content_type(path)))
    }
}

fn respond(target: &str, roots: &Roots) -> Option<(Body, &'static str)> {
    let path = target.split(['?', '#']).next().unwrap_or("");
    if let Some(rest) = path.strip_prefix("/_symb/") {
        let modules = roots.modules.as_deref()?;
        if path == LOCAL_CONFIG {
            let config =
                serde_json::json!({"url": "/_symb/lib/transformers.min.js", "wasm": "/_symb/ort/"});
            return Some((
                Body::Bytes(config.to_string().into_bytes()),
                "application/json",
            ));
        }
        let (base, file) = if let Some(file) = rest.strip_prefix("lib/") {
            (modules.join("@huggingface/transformers/dist"), file)
        } else if let Some(file) = rest.strip_prefix("ort/") {
            (modules.join("onnxruntime-web/dist"), file)
        } else {
            return None;
        };
        // npm may link packages (workspaces, pnpm): the node_modules folder
        // bounds what is served, not the package's own folder.
        return Body::file(&resolve(
            modules,
            &format!("{}/{file}", base.strip_prefix(modules).ok()?.display()),
        )?);
    }
    Body::file(&resolve(&roots.folder, path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A served folder with `index.html` and `onnx/model.onnx`, a folder
    /// beside it that must never be served, and symlinks pointing there.
    fn folder() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("dist");
        std::fs::create_dir_all(root.join("onnx")).unwrap();
        std::fs::write(root.join("index.html"), "<p>page</p>").unwrap();
        std::fs::write(
            root.join("onnx/model.onnx"),
            (0..=255u8).collect::<Vec<u8>>(),
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("secret")).unwrap();
        std::fs::write(dir.path().join("secret/passwd"), "root:x:0:0").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret/passwd"), root.join("leak.txt"))
            .unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("etcdir")).unwrap();
        std::os::unix::fs::symlink(root.join("index.html"), root.join("inside.html")).unwrap();
        let root = root.canonicalize().unwrap();
        (dir, root)
    }

    #[test]
    fn paths_cannot_leave_the_folder_by_dots_or_symlinks() {
        let (_dir, root) = folder();
        assert_eq!(
            resolve(&root, "/onnx/model.onnx?x=1"),
            Some(root.join("onnx/model.onnx"))
        );
        assert_eq!(resolve(&root, "/"), Some(root.join("index.html")));
        assert_eq!(
            resolve(&root, "/inside.html"),
            Some(root.join("index.html")),
            "a link inside the folder is served"
        );
        assert_eq!(resolve(&root, "/../secret/passwd"), None);
        assert_eq!(resolve(&root, "/%2e%2e/secret/passwd"), None);
        assert_eq!(resolve(&root, "/leak.txt"), None);
        assert_eq!(resolve(&root, "/etcdir/passwd"), None);
        assert_eq!(resolve(&root, "/missing.json"), None);
    }

    #[test]
    fn byte_ranges_follow_rfc_9110() {
        assert_eq!(byte_range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(byte_range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(byte_range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(byte_range("bytes=-500", 100), Ok(Some((0, 99))));
        assert_eq!(byte_range("bytes=50-500", 100), Ok(Some((50, 99))));
        assert_eq!(byte_range("bytes=100-", 100), Err(()));
        assert_eq!(byte_range("bytes=9-3", 100), Err(()));
        assert_eq!(byte_range("bytes=-0", 100), Err(()));
        assert_eq!(byte_range("bytes=x-1", 100), Err(()));
        assert_eq!(
            byte_range("bytes=0-1,5-6", 100),
            Ok(None),
            "several ranges: the whole file"
        );
        assert_eq!(byte_range("items=0-1", 100), Ok(None));
        assert_eq!(
            byte_range("bytes=0-18446744073709551616", 100),
            Ok(Some((0, 99))),
            "a last position past u64 is the end"
        );
        assert_eq!(byte_range("bytes=+5-9", 100), Err(()), "digits only");
        assert_eq!(
            byte_range("bytes=-99999999999999999999999", 100),
            Ok(Some((0, 99)))
        );
    }

    /// Sends `request` raw and returns the whole response (the server closes).
    fn exchange(url: &str, request: &[u8]) -> String {
        let address = url.trim_start_matches("http://").trim_end_matches('/');
        let mut stream = TcpStream::connect(address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let _ = stream.write_all(request);
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        String::from_utf8_lossy(&response).into_owned()
    }

    /// A strong ETag (the file's blake3) and Last-Modified with every file;
    /// `If-None-Match` answers 304; `If-Range` with another version's tag
    /// or date sends the whole new file, never a piece to join to the old
    /// one (RFC 9110 §13.1.5). Content-Length is digits only, and two
    /// different ones are refused (RFC 9112 §6.3).
    #[test]
    fn validators_keep_a_resumed_download_from_joining_two_versions() {
        let (_dir, root) = folder();
        let server = Server::bind(&root, 0, None).unwrap();
        let url = server.url();
        std::thread::spawn(move || server.run());
        let get = |headers: &str| {
            exchange(
                &url,
                format!(
                    "GET /onnx/model.onnx HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n"
                )
                .as_bytes(),
            )
        };
        let header = |response: &str, name: &str| {
            response
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                .map(str::to_string)
                .unwrap_or_else(|| panic!("no {name} in {response}"))
        };
        let first = get("");
        let tag = header(&first, "ETag");
        let bytes: Vec<u8> = (0..=255u8).collect();
        assert_eq!(tag, format!("\"{}\"", blake3::hash(&bytes).to_hex()));
        let modified = header(&first, "Last-Modified");
        assert!(modified.ends_with(" GMT"), "{modified}");
        assert!(
            get(&format!("If-None-Match: {tag}\r\n")).starts_with("HTTP/1.1 304 Not Modified\r\n")
        );
        assert!(get("If-None-Match: \"other\"\r\n").starts_with("HTTP/1.1 200"));
        assert!(
            get(&format!("Range: bytes=10-19\r\nIf-Range: {tag}\r\n")).starts_with("HTTP/1.1 206")
        );
        assert!(
            get(&format!("Range: bytes=10-19\r\nIf-Range: {modified}\r\n"))
                .starts_with("HTTP/1.1 206")
        );

        // A rebuild: the same name, other bytes of the same length.
        std::fs::write(
            root.join("onnx/model.onnx"),
            (0..=255u8).rev().collect::<Vec<u8>>(),
        )
        .unwrap();
        let resumed = get(&format!("Range: bytes=10-19\r\nIf-Range: {tag}\r\n"));
        assert!(
            resumed.starts_with("HTTP/1.1 200 OK\r\n")
                && resumed.contains("Content-Length: 256\r\n"),
            "{resumed}"
        );
        assert_ne!(header(&resumed, "ETag"), tag);
        assert!(
            get(&format!("If-None-Match: {tag}\r\n")).starts_with("HTTP/1.1 200"),
            "the old tag no longer matches"
        );

        for bad in [
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            "Content-Length: +5\r\n",
            "Content-Length: 5, 6\r\n",
        ] {
            assert!(get(bad).starts_with("HTTP/1.1 400"), "{bad}");
        }
        let big = get("Range: bytes=0-18446744073709551616\r\n");
        assert!(
            big.starts_with("HTTP/1.1 206") && big.contains("Content-Range: bytes 0-255/256\r\n"),
            "{big}"
        );
    }

    #[test]
    fn posts_reach_the_inbox_only_where_there_is_one_and_a_dropped_server_stops() {
        let (_dir, root) = folder();
        let post = |url: &str, name: &str, body: &str| {
            exchange(
                url,
                format!(
                    "POST {INBOX}{name} HTTP/1.1\r\nHost: x\r\nContent-Length: \
                {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
        };
        let plain = Server::bind(&root, 0, None).unwrap().spawn();
        assert!(
            post(&plain.url, "a.json", "{}").starts_with("HTTP/1.1 405"),
            "no inbox: no posts"
        );
        let (sender, inbox) = std::sync::mpsc::channel();
        let serving = Server::bind(&root, 0, None)
            .unwrap()
            .with_inbox(sender)
            .spawn();
        assert!(post(&serving.url, "a.json", "{\"x\": 1}").starts_with("HTTP/1.1 204"));
        assert_eq!(
            inbox.recv_timeout(Duration::from_secs(5)).unwrap(),
            ("a.json".to_string(), b"{\"x\": 1}".to_vec())
        );
        assert!(
            exchange(
                &serving.url,
                b"POST /index.html HTTP/1.1\r\nConnection: close\r\n\r\n"
            )
            .starts_with("HTTP/1.1 405"),
            "elsewhere, posts are refused"
        );
        let url = serving.url.clone();
        drop(serving);
        assert!(
            TcpStream::connect(url.trim_start_matches("http://").trim_end_matches('/')).is_err(),
            "dropped: the port is closed"
        );
    }

    #[test]
    fn the_server_answers_ranges_and_refuses_what_is_malformed_or_outside() {
        let (_dir, root) = folder();
        let server = Server::bind(&root, 0, None).unwrap();
        let url = server.url();
        std::thread::spawn(move || server.run());
        let get = |path: &str, headers: &str| {
            exchange(
                &url,
                format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n")
                    .as_bytes(),
            )
        };

        let page = get("/", "");
        assert!(
            page.starts_with("HTTP/1.1 200 OK\r\n") && page.ends_with("<p>page</p>"),
            "{page}"
        );
        assert!(
            page.contains("Cross-Origin-Embedder-Policy: require-corp")
                && page.contains("Cross-Origin-Opener-Policy: same-origin"),
            "{page}"
        );
        for path in [
            "/leak.txt",
            "/etcdir/passwd",
            "/../secret/passwd",
            "/%2e%2e/secret/passwd",
        ] {
            let response = get(path, "");
            assert!(
                response.starts_with("HTTP/1.1 404") && !response.contains("root:x"),
                "{path}: {response}"
            );
        }

        let part = get("/onnx/model.onnx", "Range: bytes=10-19\r\n");
        assert!(
            part.starts_with("HTTP/1.1 206 Partial Content\r\n"),
            "{part}"
        );
        assert!(
            part.contains("Content-Range: bytes 10-19/256\r\n")
                && part.contains("Content-Length: 10\r\n"),
            "{part}"
        );
        let body = part.split("\r\n\r\n").nth(1).unwrap();
        assert_eq!(body.as_bytes(), (10..20u8).collect::<Vec<u8>>());
        let whole = get("/onnx/model.onnx", "");
        assert!(
            whole.contains("Accept-Ranges: bytes") && whole.contains("Content-Length: 256\r\n"),
            "{whole}"
        );
        assert!(get("/onnx/model.onnx", "Range: bytes=300-\r\n").starts_with("HTTP/1.1 416"));

        assert!(get("/", "Content-Length: -5\r\n").starts_with("HTTP/1.1 400"));
        assert!(get("/", "Content-Length: 99999999999\r\n").starts_with("HTTP/1.1 413"));
        assert!(
            get("/", &format!("X-Long: {}\r\n", "a".repeat(64 * 1024))).starts_with("HTTP/1.1 431")
        );
        assert!(get("/", &"X-A: b\r\n".repeat(200)).starts_with("HTTP/1.1 431"));
        assert!(
            exchange(&url, b"POST / HTTP/1.1\r\nConnection: close\r\n\r\n")
                .starts_with("HTTP/1.1 405")
        );

        // Half-sent requests hold at most MAX_CONNECTIONS threads: the next
        // connection is told to come back, not left waiting.
        let address = url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let idle: Vec<TcpStream> = (0..MAX_CONNECTIONS)
            .map(|_| {
                let mut s = TcpStream::connect(&address).unwrap();
                s.write_all(b"GET / HTTP/1.1\r\nHost:").unwrap();
                s
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        assert!(get("/", "").starts_with("HTTP/1.1 503"));
        drop(idle);
        let mut served = false;
        for _ in 0..50 {
            if get("/", "").starts_with("HTTP/1.1 200") {
                served = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            served,
            "the server serves again once the idle connections close"
        );
    }

    #[test]
    fn a_request_head_that_trickles_in_is_cut_off_at_its_deadline() {
        let (_dir, root) = folder();
        let mut server = Server::bind(&root, 0, None).unwrap();
        Arc::get_mut(&mut server.roots).unwrap().head_deadline = Duration::from_millis(600);
        let address = server
            .url()
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        std::thread::spawn(move || server.run());
        let mut stream = TcpStream::connect(&address).unwrap();
        let started = std::time::Instant::now();
        let mut closed_after = None;
        for byte in b"GET / HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter() {
            if stream.write_all(&[*byte]).is_err() {
                closed_after = Some(started.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let closed_after = closed_after.unwrap_or_else(|| {
            let mut rest = Vec::new();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let _ = stream.read_to_end(&mut rest);
            started.elapsed()
        });
        assert!(
            closed_after < Duration::from_secs(4),
            "the slow head held the connection for {closed_after:?}"
        );
    }
}
