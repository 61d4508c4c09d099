//! An S3-protocol server on loopback for object-store tests: moto from PyPI (`moto[server]`,
//! installed into the virtualenv by scripts/setup.sh), stopped on drop.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A moto server on a free loopback port, stopped on drop.
pub struct MotoServer {
    child: Child,
    port: u16,
}

impl MotoServer {
    /// Starts the server and waits (up to 60 s) until it listens.
    pub fn start() -> Self {
        let port = crate::free_port();
        let child = Command::new(crate::venv_tool("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moto_server");
        let server = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen on port {port} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket with a plain (unsigned) HTTP request, which moto accepts.
    pub fn create_bucket(&self, bucket: &str) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            stream,
            "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "create bucket: {response}"
        );
    }

    /// The credentials, endpoint and region as object_store's S3 options.
    pub fn options(&self) -> Vec<(String, String)> {
        self.settings("aws_", str::to_owned)
    }

    /// The same as the `AWS_*` environment variables a process of a job gets.
    pub fn environment(&self) -> Vec<(String, String)> {
        self.settings("AWS_", str::to_uppercase)
    }

    fn settings(&self, prefix: &str, case: fn(&str) -> String) -> Vec<(String, String)> {
        [
            ("endpoint", self.endpoint()),
            ("allow_http", "true".to_owned()),
            ("access_key_id", "testing".to_owned()),
            ("secret_access_key", "testing".to_owned()),
            ("region", "us-east-1".to_owned()),
        ]
        .into_iter()
        .map(|(key, value)| (format!("{prefix}{}", case(key)), value))
        .collect()
    }

    /// Kills the server (object-store calls fail from now on) and reaps it.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        self.stop();
    }
}
