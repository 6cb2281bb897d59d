//! The event store: SQLite (WAL) under the state dir. One row per incident,
//! updated in place as its count grows; the row keeps the full ECS document
//! for `egret events --json`, plus the columns that listing and `egret top`
//! filter and group on. Also holds the daemon's counters for `egret status`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde_json::Value;

use crate::monitor::event::{self, LossFigures};
use crate::monitor::incident::Incident;
use crate::policy::Policy;

pub const DB_FILE: &str = "events.db";

pub fn db_path(state_dir: &Path) -> PathBuf {
    state_dir.join(DB_FILE)
}

/// The state dir's mode: root writes, `group` reads, nobody else enters.
pub const STATE_DIR_MODE: u32 = 0o750;
/// The store's mode (and its -wal and -shm): it holds every user's command lines.
pub const DB_MODE: u32 = 0o640;

/// The gid of `group`, when it exists.
fn group_id(group: Option<&str>) -> Option<nix::unistd::Gid> {
    let name = group.filter(|g| !g.is_empty())?;
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid)
}

/// Creates the state dir (and its parents) whatever the umask: 0750, group
/// `group` when it exists. An existing dir is made so too when it is egret's
/// (ours, not sticky, and empty or holding egret's files), never a shared
/// directory someone pointed `--state-dir` at.
pub fn prepare_state_dir(dir: &Path, group: Option<&str>) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let created = !dir.exists();
    if created {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(STATE_DIR_MODE)
            .create(dir)
            .with_context(|| format!("creating state dir {}", dir.display()))?;
    }
    let meta =
        std::fs::metadata(dir).with_context(|| format!("reading state dir {}", dir.display()))?;
    let ours = meta.uid() == nix::unistd::geteuid().as_raw()
        && meta.mode() & 0o1000 == 0
        && (created
            || db_path(dir).exists()
            || std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none()));
    if !ours {
        return Ok(());
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(STATE_DIR_MODE))
        .with_context(|| format!("setting the mode of {}", dir.display()))?;
    give_to_group(dir, group);
    Ok(())
}

/// Sets `path`'s mode (and group, when it exists), whatever the umask was.
pub fn set_file_mode(path: &Path, mode: u32, group: Option<&str>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    give_to_group(path, group);
    Ok(())
}

/// Best effort: egret run as an unprivileged user may not be in the group;
/// then only that user (and root) reads what it wrote.
fn give_to_group(path: &Path, group: Option<&str>) {
    if let Some(gid) = group_id(group) {
        if let Err(e) = nix::unistd::chown(path, None, Some(gid)) {
            tracing::warn!("giving {} to group {gid}: {e}", path.display());
        }
    }
}

/// Writes `data` to `path` through a temporary file created with `mode`
/// (not what the umask leaves), then renamed over it.
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .and_then(|()| f.write_all(data))
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// How long and how many events are kept, and how many (identity,
/// destination) pairs the `seen` table remembers for severity.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub max_age: Duration,
    pub max_rows: u64,
    /// Past it, the pairs last seen longest ago are forgotten (they are
    /// graded "new destination" again if they come back).
    pub max_seen: u64,
}

pub const DEFAULT_MAX_SEEN: u64 = 100_000;

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age: Duration::from_secs(30 * 24 * 3600),
            max_rows: 1_000_000,
            max_seen: DEFAULT_MAX_SEEN,
        }
    }
}

pub struct Store {
    conn: Connection,
}

/// Which events `events` returns: `action`, `rule` exact; `text` a
/// case-insensitive substring of who or destination.
#[derive(Debug, Clone)]
pub struct EventFilter {
    pub since: SystemTime,
    pub limit: usize,
    pub action: Option<String>,
    pub rule: Option<String>,
    pub text: Option<String>,
}

impl EventFilter {
    pub fn since(since: SystemTime, limit: usize) -> EventFilter {
        EventFilter {
            since,
            limit,
            action: None,
            rule: None,
            text: None,
        }
    }
}

/// A stored event as `egret events` lists it.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: i64,
    pub action: String,
    pub last_seen_ms: i64,
    pub count: i64,
    pub who: String,
    pub destination: String,
    pub rule: String,
    pub doc: String,
}

const RAN_WITH: &str = "ran_with";
const AUDITED_WITH: &str = "audited_with";

/// The settings an `egret run` ran with (`Store::record_run_settings`).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct RunSettings {
    /// RFC 3339, UTC.
    pub at: String,
    pub mode: String,
    /// Policy text with the settings only (no rules).
    pub settings: String,
}

/// The actions of traffic incidents, as an SQL list: egret's own events
/// (tamper, heartbeat, data loss...) are kept out of what describes traffic.
const TRAFFIC_ACTIONS: &str =
    "('blocked', 'would-block', 'dns-refused', 'dns-would-refuse', 'proxy-denied')";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY,
    action      TEXT NOT NULL,
    first_seen  INTEGER NOT NULL,
    last_seen   INTEGER NOT NULL,
    count       INTEGER NOT NULL,
    who         TEXT NOT NULL,
    destination TEXT NOT NULL,
    rule        TEXT NOT NULL,
    doc         TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_last_seen ON events(last_seen);
CREATE TABLE IF NOT EXISTS timeline (
    minute INTEGER NOT NULL,
    action TEXT NOT NULL,
    count  INTEGER NOT NULL,
    PRIMARY KEY (minute, action)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS seen (
    identity    TEXT NOT NULL,
    destination TEXT NOT NULL,
    port        INTEGER NOT NULL,
    protocol    TEXT NOT NULL,
    first_seen  INTEGER NOT NULL,
    last_seen   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (identity, destination, port, protocol)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

impl Store {
    pub fn open(state_dir: &Path) -> Result<Store> {
        Store::open_for(state_dir, None)
    }

    /// Opens (creating) the store; the state dir and the database files get
    /// their modes whatever the umask, and `group` (when it exists) may read them.
    pub fn open_for(state_dir: &Path, group: Option<&str>) -> Result<Store> {
        prepare_state_dir(state_dir, group)?;
        let path = db_path(state_dir);
        {
            // Created here with its mode, before SQLite makes it with the umask's.
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(DB_MODE)
                .open(&path)
                .with_context(|| format!("creating {}", path.display()))?;
        }
        set_file_mode(&path, DB_MODE, group)?;
        let conn =
            Connection::open(&path).with_context(|| format!("opening {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        for suffix in ["-wal", "-shm"] {
            let mut side = path.clone().into_os_string();
            side.push(suffix);
            let side = PathBuf::from(side);
            if side.exists() {
                set_file_mode(&side, DB_MODE, group)?;
            }
        }
        // WAL + NORMAL: a crash may lose the last commit, never corrupts.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)
            .with_context(|| format!("creating the schema in {}", path.display()))?;
        // Stores from before the `seen` cap lack its eviction order.
        let has_last_seen: bool = conn.query_row(
            "SELECT count(*) FROM pragma_table_info('seen') WHERE name = 'last_seen'",
            [],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if !has_last_seen {
            conn.execute_batch(
                "ALTER TABLE seen ADD COLUMN last_seen INTEGER NOT NULL DEFAULT 0;
                 UPDATE seen SET last_seen = first_seen;",
            )
            .with_context(|| format!("upgrading the seen table in {}", path.display()))?;
        }
        conn.execute_batch("CREATE INDEX IF NOT EXISTS seen_last_seen ON seen(last_seen);")?;
        Ok(Store { conn })
    }

    /// Opens an existing store read-only (for `events`, `top`, `status`).
    pub fn open_read_only(state_dir: &Path) -> Result<Option<Store>> {
        let path = db_path(state_dir);
        if !path.exists() {
            return Ok(None);
        }
        let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("opening {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(Some(Store { conn }))
    }

    pub fn next_incident_id(&self) -> Result<u64> {
        let max: Option<i64> = self
            .conn
            .query_row("SELECT max(id) FROM events", [], |r| r.get(0))?;
        Ok(max.unwrap_or(0) as u64 + 1)
    }

    /// Writes a batch of incident documents (insert or update) in one transaction.
    pub fn upsert(&mut self, batch: &[(&Incident, &Value)]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO events (id, action, first_seen, last_seen, count, who, destination, rule, doc)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT(id) DO UPDATE SET last_seen = excluded.last_seen,
                     count = excluded.count, doc = excluded.doc",
            )?;
            for (inc, doc) in batch {
                stmt.execute(params![
                    inc.id as i64,
                    inc.action().as_str(),
                    unix_ms(inc.first_seen),
                    unix_ms(inc.last_seen),
                    inc.count as i64,
                    event::who(inc),
                    event::destination(inc).unwrap_or_default(),
                    inc.key
                        .verdict
                        .rule
                        .as_deref()
                        .unwrap_or(event::DEFAULT_RULE),
                    doc.to_string(),
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// An event about egret itself (data loss, tamper), under an id the
    /// aggregator reserved so it never collides with an incident's.
    pub fn insert_event(
        &mut self,
        id: u64,
        action: &str,
        at: SystemTime,
        count: u64,
        doc: &Value,
    ) -> Result<()> {
        self.conn.execute(
            "INSERT INTO events (id, action, first_seen, last_seen, count, who, destination, rule, doc)
             VALUES (?1, ?2, ?3, ?3, ?4, 'egret', '', '', ?5)",
            params![id as i64, action, unix_ms(at), count as i64, doc.to_string()],
        )?;
        Ok(())
    }

    /// Adds attempts per (unix minute, action) in one transaction.
    pub fn add_timeline(&mut self, minutes: &[(i64, &str, u64)]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO timeline (minute, action, count) VALUES (?1, ?2, ?3)
                 ON CONFLICT(minute, action) DO UPDATE SET count = count + excluded.count",
            )?;
            for (minute, action, count) in minutes {
                stmt.execute(params![minute, action, *count as i64])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// (unix minute, action, attempts) from `since` on, oldest first.
    pub fn timeline(&self, since: SystemTime) -> Result<Vec<(i64, String, i64)>> {
        let mut stmt = self.conn.prepare(
            "SELECT minute, action, count FROM timeline WHERE minute >= ?1 ORDER BY minute, action",
        )?;
        let rows = stmt
            .query_map([unix_ms(since) / 60_000], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Records that `identity` tried this destination; true when it never had
    /// before (the row is new). Kept across restarts and event retention:
    /// what a service talks to is learned once; only `max_seen` evicts.
    pub fn first_attempt(
        &mut self,
        identity: &str,
        destination: &str,
        port: u16,
        protocol: &str,
        at: SystemTime,
    ) -> Result<bool> {
        let n = self.conn.prepare_cached(
            "INSERT OR IGNORE INTO seen (identity, destination, port, protocol, first_seen, last_seen) VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
        )?
        .execute(params![identity, destination, port, protocol, unix_ms(at)])?;
        if n == 0 {
            self.conn
                .prepare_cached(
                    "UPDATE seen SET last_seen = max(last_seen, ?5)
                     WHERE identity = ?1 AND destination = ?2 AND port = ?3 AND protocol = ?4",
                )?
                .execute(params![identity, destination, port, protocol, unix_ms(at)])?;
        }
        Ok(n == 1)
    }

    /// Rows of the novelty memory (`monitor::novelty`) in the `seen` table.
    pub fn first_seen_count(&self) -> Result<u64> {
        Ok(self.conn.query_row(
            "SELECT count(*) FROM seen WHERE protocol LIKE 'allowed:%'",
            [],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }

    /// Identities whose allowed flows to (destination, port, protocol) the
    /// novelty memory knows, with when each was first seen (unix ms).
    pub fn first_seen_by(
        &self,
        destination: &str,
        port: u16,
        protocol: u8,
        limit: usize,
    ) -> Result<Vec<(String, i64)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT identity, first_seen FROM seen
             WHERE destination = ?1 AND port = ?2 AND protocol = ?3
             ORDER BY first_seen LIMIT ?4",
        )?;
        let rows = stmt
            .query_map(
                params![
                    destination,
                    port,
                    format!("allowed:{protocol}"),
                    limit as i64
                ],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Identities that asked `name` of the DNS guard or the proxy, as the
    /// novelty memory for names (`monitor::names`) holds them: (identity,
    /// protocol `name:dns` or `name:proxy`, port, first seen in unix ms).
    pub fn name_seen_by(
        &self,
        name: &str,
        limit: usize,
    ) -> Result<Vec<(String, String, u16, i64)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT identity, protocol, port, first_seen FROM seen
             WHERE destination = ?1 AND protocol IN ('name:dns', 'name:proxy')
             ORDER BY first_seen LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![name, limit as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Rows in the `seen` table.
    pub fn seen_count(&self) -> Result<u64> {
        Ok(self
            .conn
            .query_row("SELECT count(*) FROM seen", [], |r| r.get::<_, i64>(0))? as u64)
    }

    pub fn prune(&mut self, retention: Retention, now: SystemTime) -> Result<usize> {
        let cutoff = unix_ms(now) - retention.max_age.as_millis() as i64;
        self.conn
            .execute("DELETE FROM timeline WHERE minute < ?1", [cutoff / 60_000])?;
        let mut n = self
            .conn
            .execute("DELETE FROM events WHERE last_seen < ?1", [cutoff])?;
        n += self.conn.execute(
            "DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY last_seen DESC LIMIT -1 OFFSET ?1)",
            [retention.max_rows as i64],
        )?;
        self.conn.execute(
            "DELETE FROM seen WHERE (identity, destination, port, protocol) IN
               (SELECT identity, destination, port, protocol FROM seen
                ORDER BY last_seen DESC LIMIT -1 OFFSET ?1)",
            [retention.max_seen as i64],
        )?;
        Ok(n)
    }

    pub fn put_counter(&mut self, name: &str, value: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO counters (name, value) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            params![name, value],
        )?;
        Ok(())
    }

    pub fn counter(&self, name: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM counters WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// Records the settings (mode, `[dns]`, `[proxy]`...; never rules or
    /// alert targets) `egret run` runs with, so `egret suggest` and `egret
    /// doctor` know them from the state dir alone. An audit-mode run is also
    /// kept apart: a later enforce run does not hide what the audit saw.
    /// `settings` is the policy's text without rules
    /// (`audit::policy_text::settings`).
    pub fn record_run_settings(
        &mut self,
        policy: &Policy,
        settings: &str,
        at: SystemTime,
    ) -> Result<()> {
        let record = serde_json::json!({
            "at": event::timestamp(at),
            "mode": policy.mode.as_str(),
            "settings": settings,
        })
        .to_string();
        self.put_counter(RAN_WITH, &record)?;
        if policy.mode == crate::policy::Mode::Audit {
            self.put_counter(AUDITED_WITH, &record)?;
        }
        Ok(())
    }

    /// What `record_run_settings` kept: the last audit-mode run's if any,
    /// else the last run's.
    pub fn run_settings(&self) -> Result<Option<RunSettings>> {
        let text = match self.counter(AUDITED_WITH)? {
            Some(t) => t,
            None => match self.counter(RAN_WITH)? {
                Some(t) => t,
                None => return Ok(None),
            },
        };
        Ok(serde_json::from_str(&text).ok())
    }

    /// The daemon's books, as the last `put_books` wrote them; a record
    /// this egret cannot read is reported as none.
    pub fn books(&self) -> Result<Option<super::books::DaemonBooks>> {
        Ok(self
            .counter("books")?
            .and_then(|s| serde_json::from_str(&s).ok()))
    }

    pub fn put_books(&mut self, books: &super::books::DaemonBooks) -> Result<()> {
        self.put_counter("books", &serde_json::to_string(books)?)
    }

    pub fn loss(&self) -> Result<Option<LossFigures>> {
        Ok(self
            .counter("loss")?
            .and_then(|s| serde_json::from_str(&s).ok()))
    }

    /// Events the filter selects, newest first.
    pub fn events(&self, filter: &EventFilter) -> Result<Vec<Row>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, action, last_seen, count, who, destination, rule, doc FROM events
             WHERE last_seen >= ?1
               AND (?3 IS NULL OR action = ?3)
               AND (?4 IS NULL OR rule = ?4)
               AND (?5 IS NULL OR instr(lower(who || ' ' || destination), lower(?5)) > 0)
             ORDER BY last_seen DESC, id DESC LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(
                params![
                    unix_ms(filter.since),
                    filter.limit as i64,
                    filter.action,
                    filter.rule,
                    filter.text
                ],
                |r| {
                    Ok(Row {
                        id: r.get(0)?,
                        action: r.get(1)?,
                        last_seen_ms: r.get(2)?,
                        count: r.get(3)?,
                        who: r.get(4)?,
                        destination: r.get(5)?,
                        rule: r.get(6)?,
                        doc: r.get(7)?,
                    })
                },
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// The ECS documents of incidents (not egret's own events) last seen at
    /// or after `since`, oldest first: the recorded flows `egret suggest` and
    /// `egret simulate` work from.
    pub fn incident_docs(&self, since: SystemTime) -> Result<Vec<String>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT doc FROM events WHERE last_seen >= ?1 AND action IN {TRAFFIC_ACTIONS}
             ORDER BY id"
        ))?;
        let docs = stmt
            .query_map([unix_ms(since)], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<String>>>()?;
        Ok(docs)
    }

    /// (label, packets, incidents) grouped by `column`, biggest first: of
    /// the traffic incidents, or with `action` of that action's only (e.g.
    /// `allowed-new`: who opened new allowed flows, and to where).
    pub fn top(
        &self,
        column: TopBy,
        since: SystemTime,
        limit: usize,
        action: Option<&str>,
    ) -> Result<Vec<(String, i64, i64)>> {
        let col = match column {
            TopBy::Process => "who",
            TopBy::Destination => "destination",
        };
        let sql = format!(
            "SELECT {col}, sum(count), count(*) FROM events
             WHERE last_seen >= ?1
               AND CASE WHEN ?3 IS NULL THEN action IN {TRAFFIC_ACTIONS} ELSE action = ?3 END
             GROUP BY {col} ORDER BY sum(count) DESC, {col} LIMIT ?2"
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt
            .query_map(params![unix_ms(since), limit as i64, action], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }
}

#[derive(Debug, Clone, Copy)]
pub enum TopBy {
    Process,
    Destination,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::attribution::{Attribution, Method};
    use crate::monitor::event::Action;
    use crate::monitor::incident::Aggregator;
    use crate::monitor::nflog::LoggedVerdict;
    use crate::monitor::packet::{Flow, L4Header};

    fn sample(agg: &mut Aggregator, port: u16, uid: u32, at: SystemTime) -> Incident {
        let flow = Flow {
            src: "10.1.0.1".parse().unwrap(),
            dst: "192.0.2.7".parse().unwrap(),
            protocol: 6,
            l4: L4Header::Ports { src: 1, dst: port },
        };
        let who = Attribution {
            method: Method::UidOnly,
            uid: Some(uid),
            ..Attribution::unknown()
        };
        let v = LoggedVerdict {
            blocked: true,
            rule: None,
        };
        agg.observe(&v, Some(&flow), &who, at).unwrap().clone()
    }

    #[test]
    fn incidents_upsert_list_group_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let mut agg = Aggregator::new(store.next_incident_id().unwrap());
        let now = SystemTime::now();
        let old = now - Duration::from_secs(7200);
        let mut a = sample(&mut agg, 1389, 1000, old);
        let b = sample(&mut agg, 53, 1000, now);
        let c = sample(&mut agg, 1389, 0, now);
        for inc in [&a, &b, &c] {
            store
                .upsert(&[(inc, &event::incident(inc, false, "h"))])
                .unwrap();
        }
        a.count = 10;
        a.last_seen = now;
        store
            .upsert(&[(&a, &event::incident(&a, true, "h"))])
            .unwrap();
        let rows = store
            .events(&EventFilter::since(now - Duration::from_secs(3600), 100))
            .unwrap();
        assert_eq!(rows.len(), 3, "the updated incident is recent again");
        assert_eq!(rows.iter().find(|r| r.id == a.id as i64).unwrap().count, 10);
        let doc: Value = serde_json::from_str(&rows[0].doc).unwrap();
        assert!(doc.pointer("/event/action").is_some());

        let top = store.top(TopBy::Destination, old, 10, None).unwrap();
        assert_eq!(top[0], ("192.0.2.7:1389/tcp".to_string(), 11, 2));
        let top = store.top(TopBy::Process, old, 10, None).unwrap();
        assert_eq!(top[0], ("user 1000".to_string(), 11, 2));

        assert_eq!(
            Store::open(dir.path()).unwrap().next_incident_id().unwrap(),
            c.id + 1
        );
        let pruned = store
            .prune(
                Retention {
                    max_age: Duration::from_secs(60),
                    max_rows: 2,
                    max_seen: 10,
                },
                now + Duration::from_secs(30),
            )
            .unwrap();
        assert_eq!(pruned, 1);
    }

    #[test]
    fn seen_is_capped_forgetting_the_least_recently_seen() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let t0 = SystemTime::now() - Duration::from_secs(1000);
        let at = |s: u64| t0 + Duration::from_secs(s);
        for i in 0..5u16 {
            assert!(store
                .first_attempt("exe:/a", "192.0.2.1", i, "6", at(i.into()))
                .unwrap());
        }
        // Port 0 was first seen first but seen again last: it stays.
        assert!(!store
            .first_attempt("exe:/a", "192.0.2.1", 0, "6", at(100))
            .unwrap());
        let keep = Retention {
            max_seen: 2,
            ..Retention::default()
        };
        store.prune(keep, at(200)).unwrap();
        assert_eq!(store.seen_count().unwrap(), 2);
        assert!(!store
            .first_attempt("exe:/a", "192.0.2.1", 0, "6", at(300))
            .unwrap());
        assert!(!store
            .first_attempt("exe:/a", "192.0.2.1", 4, "6", at(300))
            .unwrap());
        assert!(store
            .first_attempt("exe:/a", "192.0.2.1", 1, "6", at(300))
            .unwrap());
    }

    #[test]
    fn incident_documents_leave_out_egrets_own_events() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let mut agg = Aggregator::new(1);
        let now = SystemTime::now();
        let a = sample(&mut agg, 1389, 1000, now - Duration::from_secs(60));
        let b = sample(&mut agg, 53, 0, now);
        for inc in [&b, &a] {
            store
                .upsert(&[(inc, &event::incident(inc, false, "h"))])
                .unwrap();
        }
        store
            .insert_event(
                b.id + 1,
                Action::DataLoss.as_str(),
                now,
                1,
                &serde_json::json!({}),
            )
            .unwrap();
        let docs = store
            .incident_docs(now - Duration::from_secs(3600))
            .unwrap();
        assert_eq!(docs.len(), 2, "incidents only, not egret's own events");
        assert!(docs[0].contains("1389"), "in incident order");
        assert_eq!(store.incident_docs(now).unwrap().len(), 1);
    }

    #[test]
    fn top_of_one_action_lists_first_seen_allowed_flows_apart() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let mut agg = Aggregator::new(1);
        let now = SystemTime::now();
        let blocked = sample(&mut agg, 1389, 1000, now);
        let who = Attribution {
            method: Method::UidOnly,
            uid: Some(1000),
            ..Attribution::unknown()
        };
        let allowed = LoggedVerdict {
            blocked: false,
            rule: Some("web".into()),
        };
        let mut new = Vec::new();
        for port in [443, 8443] {
            let flow = Flow {
                src: "10.1.0.1".parse().unwrap(),
                dst: "192.0.2.9".parse().unwrap(),
                protocol: 6,
                l4: L4Header::Ports { src: 1, dst: port },
            };
            let inc = agg
                .record(crate::monitor::incident::Observation {
                    verdict: &allowed,
                    subject: event::Subject::AllowedNew(flow),
                    attribution: &who,
                    resolved: None,
                    at: now,
                })
                .unwrap()
                .clone();
            assert_eq!(inc.action(), Action::AllowedNew);
            new.push(inc);
        }
        for inc in new.iter().chain([&blocked]) {
            store
                .upsert(&[(inc, &event::incident(inc, false, "h"))])
                .unwrap();
        }
        let since = now - Duration::from_secs(60);
        // The blocked tables stay what they were.
        let top = store.top(TopBy::Process, since, 10, None).unwrap();
        assert_eq!(top, [("user 1000".to_string(), 1, 1)]);
        let top = store
            .top(TopBy::Process, since, 10, Some("allowed-new"))
            .unwrap();
        assert_eq!(top, [("user 1000".to_string(), 2, 2)]);
        let top = store
            .top(TopBy::Destination, since, 10, Some("allowed-new"))
            .unwrap();
        assert_eq!(top.len(), 2, "{top:?}");
        assert!(
            top.iter().any(|(d, ..)| d == "192.0.2.9:8443/tcp"),
            "{top:?}"
        );
        let mut f = EventFilter::since(since, 10);
        f.action = Some("allowed-new".into());
        let rows = store.events(&f).unwrap();
        assert_eq!(rows.len(), 2);
        assert!(
            rows.iter().all(|r| r.rule == "web"),
            "the rule that allowed it"
        );
    }

    #[test]
    fn top_tables_leave_out_egrets_own_events() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let mut agg = Aggregator::new(1);
        let now = SystemTime::now();
        let a = sample(&mut agg, 1389, 1000, now);
        store
            .upsert(&[(&a, &event::incident(&a, false, "h"))])
            .unwrap();
        let own = [
            Action::Tamper,
            Action::Heartbeat,
            Action::DataLoss,
            Action::AlertDigest,
        ];
        for (i, &action) in own.iter().enumerate() {
            store
                .insert_event(
                    a.id + 1 + i as u64,
                    action.as_str(),
                    now,
                    100,
                    &serde_json::json!({}),
                )
                .unwrap();
        }
        let since = now - Duration::from_secs(60);
        for by in [TopBy::Process, TopBy::Destination] {
            let top = store.top(by, since, 10, None).unwrap();
            assert_eq!(top.len(), 1, "{by:?}: {top:?}");
            assert_eq!(top[0].1, 1, "{by:?}: {top:?}");
        }
    }

    #[test]
    fn state_dir_and_store_get_their_modes_but_shared_dirs_are_left_alone() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("a/b");
        drop(Store::open(&state).unwrap());
        assert_eq!(mode(&state), STATE_DIR_MODE);
        assert_eq!(mode(&db_path(&state)), DB_MODE);
        // An existing store's dir left wide open is narrowed.
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::set_permissions(db_path(&state), std::fs::Permissions::from_mode(0o666)).unwrap();
        drop(Store::open(&state).unwrap());
        assert_eq!((mode(&state), mode(&db_path(&state))), (0o750, 0o640));
        // A shared sticky directory pointed at by mistake keeps its mode.
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        prepare_state_dir(&shared, None).unwrap();
        assert_eq!(mode(&shared), 0o1777);
        // A non-empty directory that is not egret's keeps its mode.
        let home = dir.path().join("home");
        std::fs::create_dir(&home).unwrap();
        std::fs::write(home.join(".profile"), "").unwrap();
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare_state_dir(&home, None).unwrap();
        assert_eq!(mode(&home), 0o755);
        // Files written through write_file get the mode asked for.
        let f = state.join("x.json");
        write_file(&f, b"{}", 0o600).unwrap();
        assert_eq!(mode(&f), 0o600);
    }
}
