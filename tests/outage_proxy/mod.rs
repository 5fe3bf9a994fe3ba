//! A TCP proxy for outage tests: it sits between the ledger and the shared PostgreSQL server
//! (which other tests use, so it is never stopped) and can cut every connection through it,
//! refusing new ones, then restore service; or let the next connection fall silent partway, as
//! one does whose peer vanished without closing it.
#![allow(dead_code, reason = "each outage test uses a different part of the proxy")]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP proxy on its own thread and runtime, so it keeps forwarding whatever the test does.
pub struct Proxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    /// If not zero, the next connection goes silent after this many bytes from the server.
    silence_next_after_bytes: Arc<AtomicUsize>,
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    pub fn start(upstream: String) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let silence_next_after_bytes = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let (cut_flag, silence, registry) = (cut.clone(), silence_next_after_bytes.clone(), connections.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if cut_flag.load(Ordering::SeqCst) {
                        continue; // dropped: the connection is refused while cut
                    }
                    let upstream = upstream.clone();
                    let silent_after_bytes = silence.swap(0, Ordering::SeqCst);
                    let task = tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(upstream).await else { return };
                        if silent_after_bytes == 0 {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        } else {
                            forward_then_fall_silent(inbound, outbound, silent_after_bytes).await;
                        }
                    });
                    registry.lock().unwrap().push(task.abort_handle());
                }
            });
        });
        Proxy { port, cut, silence_next_after_bytes, connections }
    }

    /// The next connection forwards `bytes` from the server, then nothing either way, while
    /// both ends stay open: neither side hears an end or an error.
    pub fn silence_next_after(&self, bytes: usize) {
        assert!(bytes > 0);
        self.silence_next_after_bytes.store(bytes, Ordering::SeqCst);
    }

    /// Drops every open connection and refuses new ones, as a dead server or network would.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// Forwards the client's bytes as they come and the server's up to `bytes`, then holds both
/// sockets open without forwarding anything more, until the proxy's task is aborted.
async fn forward_then_fall_silent(mut inbound: TcpStream, mut outbound: TcpStream, bytes: usize) {
    let (mut client_read, mut client_write) = inbound.split();
    let (mut server_read, mut server_write) = outbound.split();
    let client_to_server = tokio::io::copy(&mut client_read, &mut server_write);
    let server_to_client = async {
        let mut buffer = [0_u8; 4_096];
        let mut forwarded = 0;
        while forwarded < bytes {
            let room = (bytes - forwarded).min(buffer.len());
            match server_read.read(&mut buffer[..room]).await {
                Ok(0) | Err(_) => break,
                Ok(read) => {
                    if client_write.write_all(&buffer[..read]).await.is_err() {
                        break;
                    }
                    forwarded += read;
                }
            }
        }
        std::future::pending::<()>().await
    };
    let _ = tokio::join!(client_to_server, server_to_client);
}
