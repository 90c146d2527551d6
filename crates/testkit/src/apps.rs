//! Small apps that stand in for workloads.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppKind {
    /// Writes a banner line naming itself, then echoes every byte.
    Echo,
    /// Reads until EOF, then writes the byte count as 8 bytes big-endian.
    Sink,
}

/// A running app; dropping it stops the listener.
pub struct App {
    pub addr: SocketAddr,
    pub name: String,
    task: JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl App {
    pub async fn start(kind: AppKind, name: &str) -> std::io::Result<App> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let banner = format!("{name}\n");
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    continue;
                };
                let _ = s.set_nodelay(true);
                let banner = banner.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    match kind {
                        AppKind::Echo => {
                            if s.write_all(banner.as_bytes()).await.is_err() {
                                return;
                            }
                            loop {
                                match s.read(&mut buf).await {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => {
                                        if s.write_all(&buf[..n]).await.is_err() {
                                            break;
                                        }
                                    }
                                }
                            }
                            let _ = s.shutdown().await;
                        }
                        AppKind::Sink => {
                            let mut total = 0u64;
                            loop {
                                match s.read(&mut buf).await {
                                    Ok(0) => break,
                                    Ok(n) => total += n as u64,
                                    Err(_) => return,
                                }
                            }
                            let _ = s.write_all(&total.to_be_bytes()).await;
                            let _ = s.shutdown().await;
                        }
                    }
                });
            }
        });
        Ok(App {
            addr,
            name: name.to_owned(),
            task,
        })
    }
}
