//! Slow-statement logging of the read side's pool: a statement slower than the threshold is
//! logged at WARN as a slow statement; a fast one is not. The threshold (1 s) is far above what
//! `SELECT 1` takes even on a loaded machine, and `pg_sleep` guarantees the slow one is slower.

use std::io::Write;
use std::sync::{Arc, Mutex};

use diboas_ledger::readside::pool;
use sqlx::PgPool;

/// Log output captured in memory.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture lock").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("capture lock")).into_owned()
    }
}

#[sqlx::test]
async fn statements_over_the_threshold_are_logged_as_slow(pool: PgPool) {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("sqlx::query=warn")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let read_pool = pool::connect(&pool.connect_options(), 1, 1_000);
    sqlx::query("SELECT 1 AS quick").execute(&read_pool).await.expect("a fast statement");
    assert!(!capture.text().contains("slow statement"), "{}", capture.text());
    sqlx::query("SELECT pg_sleep(1.1) AS slow_one").execute(&read_pool).await.expect("a slow statement");
    let logged = capture.text();
    assert!(logged.contains("WARN") && logged.contains("slow statement"), "{logged}");
    assert!(logged.contains("slow_one"), "{logged}");
    read_pool.close().await;
}
