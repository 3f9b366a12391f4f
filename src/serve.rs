//! `symb serve`: an output folder and its playground page over HTTP on
//! 127.0.0.1, with the cross-origin isolation headers (COOP/COEP) that
//! multithreaded WebAssembly needs.
//!
//! With a local transformers.js (`--transformers-js`, a `node_modules`
//! folder holding `@huggingface/transformers` and `onnxruntime-web`), the
//! page loads the library and ONNX Runtime's WebAssembly from this server and
//! nothing leaves the machine; without, from the URL the page names (a CDN).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};

/// Where the page finds transformers.js when the server has a local copy.
pub const LOCAL_CONFIG: &str = "/_symb/transformers.json";

pub struct Server {
    listener: TcpListener,
    root: PathBuf,
    /// A `node_modules` folder with transformers.js and onnxruntime-web.
    modules: Option<PathBuf>,
}

impl Server {
    /// Binds 127.0.0.1:`port` (0: any free port).
    pub fn bind(root: &Path, port: u16, modules: Option<&Path>) -> std::io::Result<Self> {
        if let Some(m) = modules {
            let lib = m.join("@huggingface/transformers/dist/transformers.min.js");
            if !lib.is_file() {
                return Err(std::io::Error::other(format!(
                    "`{}` has no @huggingface/transformers/dist/transformers.min.js (give the node_modules folder of `npm install @huggingface/transformers`)",
                    m.display()
                )));
            }
        }
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        Ok(Server { listener, root: root.to_path_buf(), modules: modules.map(Path::to_path_buf) })
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.listener.local_addr().expect("bound"))
    }

    /// Serves until the process ends, one thread per connection.
    pub fn run(self) -> std::io::Result<()> {
        let shared = std::sync::Arc::new((self.root, self.modules));
        for stream in self.listener.incoming() {
            let Ok(stream) = stream else { continue };
            let shared = shared.clone();
            std::thread::spawn(move || {
                let _ = handle(stream, &shared.0, shared.1.as_deref());
            });
        }
        Ok(())
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

/// `request` (a URL path) as a file under `root`, refusing anything that
/// leaves it.
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
    Some(out)
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

fn handle(stream: TcpStream, root: &Path, modules: Option<&Path>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut stream = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("/").to_string());
        let mut keep_alive = true;
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Ok(());
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            let lower = header.to_ascii_lowercase();
            if lower == "connection: close" {
                keep_alive = false;
            }
            if let Some(n) = lower.strip_prefix("content-length:") {
                length = n.trim().parse().unwrap_or(0);
            }
        }
        if length > 0 {
            std::io::copy(&mut (&mut reader).take(length as u64), &mut std::io::sink())?;
        }
        let (status, body, kind): (&str, Body, &str) = if method != "GET" && method != "HEAD" {
            ("405 Method Not Allowed", Body::Bytes(b"only GET and HEAD\n".to_vec()), "text/plain")
        } else {
            match respond(&target, root, modules) {
                Some((body, kind)) => ("200 OK", body, kind),
                None => ("404 Not Found", Body::Bytes(b"not found\n".to_vec()), "text/plain"),
            }
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCross-Origin-Opener-Policy: same-origin\r\nCross-Origin-Embedder-Policy: require-corp\r\nCross-Origin-Resource-Policy: same-origin\r\nCache-Control: no-store\r\nConnection: {}\r\n\r\n",
            body.len(),
            if keep_alive { "keep-alive" } else { "close" }
        );
        stream.write_all(head.as_bytes())?;
        if method != "HEAD" {
            match body {
                Body::Bytes(bytes) => stream.write_all(&bytes)?,
                Body::File(mut file, _) => {
                    std::io::copy(&mut file, &mut stream)?;
                }
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
}

impl Body {
    fn len(&self) -> u64 {
        match self {
            Body::Bytes(b) => b.len() as u64,
            Body::File(_, n) => *n,
        }
    }

    fn file(path: &Path) -> Option<(Body, &'static str)> {
        let file = std::fs::File::open(path).ok()?;
        let len = file.metadata().ok().filter(|m| m.is_file())?.len();
        Some((Body::File(file, len), content_type(path)))
    }
}

fn respond(target: &str, root: &Path, modules: Option<&Path>) -> Option<(Body, &'static str)> {
    let path = target.split(['?', '#']).next().unwrap_or("");
    if let Some(rest) = path.strip_prefix("/_symb/") {
        let modules = modules?;
        if path == LOCAL_CONFIG {
            let config = serde_json::json!({"url": "/_symb/lib/transformers.min.js", "wasm": "/_symb/ort/"});
            return Some((Body::Bytes(config.to_string().into_bytes()), "application/json"));
        }
        let (base, file) = if let Some(file) = rest.strip_prefix("lib/") {
            (modules.join("@huggingface/transformers/dist"), file)
        } else if let Some(file) = rest.strip_prefix("ort/") {
            (modules.join("onnxruntime-web/dist"), file)
        } else {
            return None;
        };
        return Body::file(&resolve(&base, file)?);
    }
    Body::file(&resolve(root, path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_cannot_leave_the_folder() {
        let root = Path::new("/srv/dist");
        assert_eq!(resolve(root, "/onnx/model.onnx?x=1"), Some(PathBuf::from("/srv/dist/onnx/model.onnx")));
        assert_eq!(resolve(root, "/a%20b.json"), Some(PathBuf::from("/srv/dist/a b.json")));
        assert_eq!(resolve(root, "/../etc/passwd"), None);
        assert_eq!(resolve(root, "/%2e%2e/etc/passwd"), None);
    }
}
