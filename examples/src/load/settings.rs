//! Settings outside this project that shape a run's tail, recorded with its
//! results so runs on differently tuned machines are not compared blind.
//!
//! PostgreSQL 15 extends a table by writing zero pages it does not sync;
//! the kernel writes them back once they are `dirty_expire_centisecs` old,
//! the whole file's pages at once (55–85 MB in 100 ms at 500 sagas/s here),
//! and commits wait behind that (`docs/performance.md`, twenty-second
//! session). `autovacuum` decides whether the server analyzes the growing
//! tables on its own, each time making every connection plan again. The
//! settings that decide durability are read here too, for the ceiling.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::error::LoadError;
use super::raw::Durability;
use super::stage::Stage;

/// The kernel's writeback settings, files of `/proc/sys/vm`.
const KERNEL_WRITEBACK: [&str; 6] = [
    "dirty_expire_centisecs",
    "dirty_writeback_centisecs",
    "dirty_background_ratio",
    "dirty_background_bytes",
    "dirty_ratio",
    "dirty_bytes",
];

/// PostgreSQL's settings, as `SHOW` gives them.
const POSTGRES: [&str; 6] = [
    "autovacuum",
    "shared_buffers",
    "checkpoint_timeout",
    "max_wal_size",
    "synchronous_commit",
    "fsync",
];

/// What the machine was set to during the run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TailSettings {
    /// `vm.<name>`: value. Empty where `/proc/sys/vm` cannot be read (not
    /// Linux).
    pub kernel: BTreeMap<String, u64>,
    /// Setting: value, as the server shows it.
    pub postgres: BTreeMap<String, String>,
}

impl TailSettings {
    /// Reads the kernel's settings and, over a connection to the run's
    /// database, PostgreSQL's.
    pub(crate) async fn read(stage: &Stage) -> Result<Self, LoadError> {
        let rows: Vec<(String, String)> = stage
            .on_database("reading the server's settings", async |conn| {
                sqlx::query_as("SELECT name, current_setting(name) FROM unnest($1::text[]) AS name")
                    .bind(POSTGRES.as_slice())
                    .fetch_all(conn)
                    .await
            })
            .await?;
        Ok(Self {
            kernel: kernel_writeback(Path::new("/proc/sys/vm")),
            postgres: rows.into_iter().collect(),
        })
    }

    /// The settings that decide durability (empty if not read).
    pub(crate) fn durability(&self) -> Durability {
        let setting = |name: &str| self.postgres.get(name).cloned().unwrap_or_default();
        Durability {
            synchronous_commit: setting("synchronous_commit"),
            fsync: setting("fsync"),
        }
    }

    /// One line for the printed report.
    pub(crate) fn render(&self) -> String {
        let postgres: Vec<String> = self
            .postgres
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        let kernel: Vec<String> = self
            .kernel
            .iter()
            .map(|(name, value)| format!("vm.{name}={value}"))
            .collect();
        let kernel = if kernel.is_empty() {
            "not read".to_owned()
        } else {
            kernel.join(" ")
        };
        format!("settings: PostgreSQL {}; kernel {kernel}", postgres.join(" "))
    }
}

/// The [`KERNEL_WRITEBACK`] files of `dir` that hold a number.
fn kernel_writeback(dir: &Path) -> BTreeMap<String, u64> {
    KERNEL_WRITEBACK
        .iter()
        .filter_map(|name| {
            let text = std::fs::read_to_string(dir.join(name)).ok()?;
            Some(((*name).to_owned(), text.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_settings_are_the_numeric_files_present() {
        let dir = std::env::temp_dir().join(format!("saga_load_vm_{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        std::fs::write(dir.join("dirty_expire_centisecs"), "3000\n").expect("written");
        std::fs::write(dir.join("dirty_background_bytes"), "0\n").expect("written");
        std::fs::write(dir.join("dirty_ratio"), "twenty\n").expect("written");
        let read = kernel_writeback(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        let expected: BTreeMap<String, u64> = [("dirty_background_bytes", 0), ("dirty_expire_centisecs", 3000)]
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect();
        assert_eq!(read, expected, "missing and unparsable files are left out");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_kernel_reports_when_it_writes_dirty_pages_back() {
        let read = kernel_writeback(Path::new("/proc/sys/vm"));
        assert!(read.contains_key("dirty_expire_centisecs"), "{read:?}");
        assert!(read.contains_key("dirty_writeback_centisecs"), "{read:?}");
    }

    #[test]
    fn durability_is_read_off_the_servers_settings() {
        let settings = TailSettings {
            kernel: BTreeMap::new(),
            postgres: [("synchronous_commit", "on"), ("fsync", "off")]
                .into_iter()
                .map(|(name, value)| (name.to_owned(), value.to_owned()))
                .collect(),
        };
        let durability = settings.durability();
        assert_eq!(
            (durability.synchronous_commit.as_str(), durability.fsync.as_str()),
            ("on", "off")
        );
    }

    #[test]
    fn the_line_names_every_setting() {
        let settings = TailSettings {
            kernel: [("dirty_expire_centisecs".to_owned(), 3000)].into_iter().collect(),
            postgres: [("autovacuum".to_owned(), "off".to_owned())].into_iter().collect(),
        };
        assert_eq!(
            settings.render(),
            "settings: PostgreSQL autovacuum=off; kernel vm.dirty_expire_centisecs=3000"
        );
        let elsewhere = TailSettings {
            kernel: BTreeMap::new(),
            ..settings
        };
        assert!(
            elsewhere.render().ends_with("; kernel not read"),
            "{}",
            elsewhere.render()
        );
    }
}
