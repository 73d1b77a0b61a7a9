//! Object storage with Kubernetes' versioning: one global resourceVersion
//! counter, a bounded history of change events for watches to resume from,
//! a broadcast of each change to live watches, and an optional append-only
//! log so that a restarted lab keeps its objects and never reuses a version.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::resources::ResourceKey;
use super::status::ApiError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// A stored object: its JSON as served, and the little that reads need
/// without parsing it. A parsed `serde_json::Value` of a typical pod takes
/// about 12 KiB; its JSON about 1 KiB. Objects are parsed only to be changed.
#[derive(Debug, Clone)]
pub struct Object {
    pub json: Bytes,
    pub api_version: Box<str>,
    pub uid: Box<str>,
    labels: Box<[(Box<str>, Box<str>)]>,
}

impl Object {
    pub fn from_value(value: &Value) -> Object {
        let meta = &value["metadata"];
        let text = |v: &Value| v.as_str().unwrap_or("").into();
        let labels = meta["labels"]
            .as_object()
            .map(|l| {
                l.iter()
                    .map(|(k, v)| (k.as_str().into(), v.as_str().unwrap_or("").into()))
                    .collect()
            })
            .unwrap_or_default();
        Object {
            // Serialising a Value cannot fail.
            json: Bytes::from(serde_json::to_vec(value).unwrap_or_default()),
            api_version: text(&value["apiVersion"]),
            uid: text(&meta["uid"]),
            labels,
        }
    }

    /// The object parsed, to be changed. The JSON was written by this server,
    /// so it always parses.
    pub fn value(&self) -> Value {
        serde_json::from_slice(&self.json).unwrap_or(Value::Null)
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| &**k == key)
            .map(|(_, v)| &**v)
    }
}

/// One change, shared by every watch that sees it.
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub key: ResourceKey,
    pub namespace: String,
    pub name: String,
    pub kind: EventType,
    pub object: Arc<Object>,
    /// The object before a modification, so that a watch with a label
    /// selector can turn "stopped matching" into DELETED.
    pub previous: Option<Arc<Object>>,
    /// The event as one line of the watch stream, framed once for all.
    pub line: Bytes,
}

/// `{"type":…,"object":…}\n`, the watch stream's framing, around JSON
/// that is already serialised.
pub fn event_line(kind: &str, object_json: &[u8]) -> Bytes {
    let mut line = Vec::with_capacity(object_json.len() + 32);
    line.extend_from_slice(b"{\"type\":\"");
    line.extend_from_slice(kind.as_bytes());
    line.extend_from_slice(b"\",\"object\":");
    line.extend_from_slice(object_json);
    line.extend_from_slice(b"}\n");
    Bytes::from(line)
}

/// (namespace, name); the namespace is empty for cluster-scoped objects.
pub type ObjectId = (String, String);

type Objects = BTreeMap<ObjectId, Arc<Object>>;

/// Objects in (namespace, name) order.
pub type Listing<'a> = Box<dyn Iterator<Item = (&'a ObjectId, &'a Arc<Object>)> + 'a>;

pub struct Store {
    rv: u64,
    /// Watches may resume from any version at or above this one.
    floor: u64,
    history: VecDeque<Arc<Event>>,
    history_limit: usize,
    objects: HashMap<ResourceKey, Objects>,
    events: broadcast::Sender<Arc<Event>>,
    log: Option<Log>,
}

/// How far behind a live watch may fall before it is ended (the client then
/// resumes from its last version, or relists).
const BROADCAST_CAPACITY: usize = 65_536;

impl Store {
    pub fn new(history_limit: usize) -> Self {
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        Store {
            rv: 0,
            floor: 0,
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            objects: HashMap::new(),
            events,
            log: None,
        }
    }

    /// Opens (or creates) a persistent store in `dir`. The log is rewritten
    /// compactly at every open, so it does not grow across restarts.
    pub fn open(dir: &Path, history_limit: usize) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("objects.jsonl");
        let mut store = Store::new(history_limit);
        if path.exists() {
            let reader = BufReader::new(File::open(&path)?);
            for (number, line) in reader.lines().enumerate() {
                let line = line?;
                if line.trim().is_empty() {
                    continue;
                }
                // A torn last line (crash mid-write) is skipped, not fatal.
                let Ok(record) = serde_json::from_str::<LogRecord>(&line) else {
                    tracing::warn!(line = number + 1, path = %path.display(), "skipping unreadable log record");
                    continue;
                };
                store.rv = store.rv.max(record.rv);
                let objects = store.objects.entry(record.key()).or_default();
                let id = (record.namespace, record.name);
                match record.object {
                    Some(object) => {
                        objects.insert(id, Arc::new(Object::from_value(&object)));
                    }
                    None => {
                        objects.remove(&id);
                    }
                }
            }
        }
        store.floor = store.rv;
        store.log = Some(Log::rewrite(&path, store.rv, &store.objects)?);
        Ok(store)
    }

    pub fn current_rv(&self) -> u64 {
        self.rv
    }

    pub fn floor(&self) -> u64 {
        self.floor
    }

    pub fn get(&self, key: &ResourceKey, namespace: &str, name: &str) -> Option<Arc<Object>> {
        self.objects
            .get(key)?
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Objects of a resource in name order, within one namespace or all.
    /// `after` resumes a paged list after that (namespace, name).
    pub fn list<'a>(
        &'a self,
        key: &ResourceKey,
        namespace: Option<&'a str>,
        after: Option<(String, String)>,
    ) -> Listing<'a> {
        let Some(objects) = self.objects.get(key) else {
            return Box::new(std::iter::empty());
        };
        use std::ops::Bound;
        let start = match (&after, namespace) {
            (Some(after), _) => Bound::Excluded(after.clone()),
            (None, Some(ns)) => Bound::Included((ns.to_string(), String::new())),
            (None, None) => Bound::Unbounded,
        };
        Box::new(
            objects
                .range((start, Bound::Unbounded))
                .take_while(move |((ns, _), _)| namespace.is_none_or(|want| want == ns)),
        )
    }

    pub fn namespaces_in_use(&self, namespace: &str) -> Vec<(ResourceKey, String)> {
        let mut found = Vec::new();
        for (key, objects) in &self.objects {
            for (ns, name) in objects.keys() {
                if ns == namespace {
                    found.push((key.clone(), name.clone()));
                }
            }
        }
        found
    }

    pub fn keys(&self, key: &ResourceKey) -> Vec<(String, String)> {
        self.objects
            .get(key)
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Stores an object under a new resourceVersion and tells every watch.
    pub fn put(
        &mut self,
        key: &ResourceKey,
        namespace: &str,
        name: &str,
        mut object: Value,
    ) -> Result<Arc<Object>, ApiError> {
        let rv = self.rv + 1;
        set_rv(&mut object, rv);
        let object = Arc::new(Object::from_value(&object));
        let at = At::new(rv, key, namespace, name);
        self.append(&at, Some(&object.json))?;
        self.rv = rv;
        let id = (namespace.to_string(), name.to_string());
        let previous = self
            .objects
            .entry(key.clone())
            .or_default()
            .insert(id, object.clone());
        let kind = if previous.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.emit(&at, kind, object.clone(), previous);
        Ok(object)
    }

    /// Removes an object; the DELETED event carries its last state at a new
    /// resourceVersion, as the real server's does.
    pub fn remove(
        &mut self,
        key: &ResourceKey,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Arc<Object>>, ApiError> {
        let id = (namespace.to_string(), name.to_string());
        let Some(existing) = self.objects.get(key).and_then(|o| o.get(&id)).cloned() else {
            return Ok(None);
        };
        let rv = self.rv + 1;
        let at = At::new(rv, key, namespace, name);
        self.append(&at, None)?;
        self.rv = rv;
        if let Some(objects) = self.objects.get_mut(key) {
            objects.remove(&id);
        }
        let mut last = existing.value();
        set_rv(&mut last, rv);
        let last = Arc::new(Object::from_value(&last));
        self.emit(&at, EventType::Deleted, last.clone(), None);
        Ok(Some(last))
    }

    fn emit(
        &mut self,
        at: &At<'_>,
        kind: EventType,
        object: Arc<Object>,
        previous: Option<Arc<Object>>,
    ) {
        let event = Arc::new(Event {
            rv: at.rv,
            key: at.key.clone(),
            namespace: at.namespace.to_string(),
            name: at.name.to_string(),
            kind,
            line: event_line(kind.as_str(), &object.json),
            object,
            previous,
        });
        self.history.push_back(event.clone());
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.floor = old.rv;
            }
        }
        // No receivers is normal: nobody is watching.
        let _ = self.events.send(event);
    }

    fn append(&mut self, at: &At<'_>, object: Option<&[u8]>) -> Result<(), ApiError> {
        if let Some(log) = &mut self.log {
            log.append(at, object)
                .map_err(|e| ApiError::internal(format!("persisting the change failed: {e}")))?;
        }
        Ok(())
    }

    /// A live feed of changes, and the history after `since` to replay first.
    /// Taken together under one lock, so no change falls between the two.
    #[allow(clippy::type_complexity)]
    pub fn watch_from(
        &self,
        since: u64,
    ) -> Result<(Vec<Arc<Event>>, broadcast::Receiver<Arc<Event>>), ApiError> {
        if since < self.floor {
            return Err(ApiError::expired(format!(
                "too old resource version: {since} ({})",
                self.floor
            )));
        }
        let replay = self
            .history
            .iter()
            .skip_while(|e| e.rv <= since)
            .cloned()
            .collect();
        Ok((replay, self.events.subscribe()))
    }

    /// Forgets all history, as etcd compaction does: watches resuming from
    /// any older version get 410 Expired and must relist.
    pub fn compact(&mut self) {
        self.history.clear();
        self.floor = self.rv;
    }
}

fn set_rv(object: &mut Value, rv: u64) {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
    }
}

#[derive(serde::Deserialize)]
struct LogRecord {
    rv: u64,
    group: String,
    resource: String,
    namespace: String,
    name: String,
    object: Option<Value>,
}

impl LogRecord {
    fn key(&self) -> ResourceKey {
        ResourceKey {
            group: self.group.clone(),
            resource: self.resource.clone(),
        }
    }
}

struct Log {
    file: BufWriter<File>,
}

/// Where a change happened: its resourceVersion and the object's place.
struct At<'a> {
    rv: u64,
    key: &'a ResourceKey,
    namespace: &'a str,
    name: &'a str,
}

impl<'a> At<'a> {
    fn new(rv: u64, key: &'a ResourceKey, namespace: &'a str, name: &'a str) -> Self {
        At {
            rv,
            key,
            namespace,
            name,
        }
    }
}

impl Log {
    fn rewrite(
        path: &Path,
        rv: u64,
        objects: &HashMap<ResourceKey, Objects>,
    ) -> std::io::Result<Self> {
        let tmp: PathBuf = path.with_extension("jsonl.tmp");
        {
            let mut out = BufWriter::new(File::create(&tmp)?);
            let mut log = Log { file: out };
            // A marker that keeps the version counter even with no objects.
            let none = ResourceKey {
                group: String::new(),
                resource: String::new(),
            };
            let marker = At::new(rv, &none, "", "");
            log.write_record(&marker, None)?;
            for (key, objects) in objects {
                for ((namespace, name), object) in objects {
                    let at = At::new(rv, key, namespace, name);
                    log.write_record(&at, Some(&object.json))?;
                }
            }
            out = log.file;
            out.flush()?;
            out.get_ref().sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        let file = std::fs::OpenOptions::new().append(true).open(path)?;
        Ok(Log {
            file: BufWriter::new(file),
        })
    }

    fn write_record(&mut self, at: &At<'_>, object: Option<&[u8]>) -> std::io::Result<()> {
        let head = json!({
            "rv": at.rv,
            "group": at.key.group,
            "resource": at.key.resource,
            "namespace": at.namespace,
            "name": at.name,
        });
        let head = serde_json::to_vec(&head)?;
        // The object is already JSON: splice it in rather than re-encode it.
        self.file.write_all(&head[..head.len() - 1])?;
        self.file.write_all(b",\"object\":")?;
        self.file.write_all(object.unwrap_or(b"null"))?;
        self.file.write_all(b"}\n")
    }

    fn append(&mut self, at: &At<'_>, object: Option<&[u8]>) -> std::io::Result<()> {
        self.write_record(at, object)?;
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ResourceKey {
        ResourceKey {
            group: String::new(),
            resource: "services".into(),
        }
    }

    fn svc(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "demo"}})
    }

    #[test]
    fn versions_rise_and_history_is_bounded() {
        let mut store = Store::new(2);
        let a = store.put(&key(), "demo", "a", svc("a")).unwrap();
        assert_eq!(a.value()["metadata"]["resourceVersion"], "1");
        store.put(&key(), "demo", "b", svc("b")).unwrap();
        store.put(&key(), "demo", "a", svc("a")).unwrap();
        assert_eq!(store.current_rv(), 3);
        // History holds versions 2 and 3; resuming from 1 replays both.
        let (replay, _) = store.watch_from(1).unwrap();
        assert_eq!(replay.iter().map(|e| e.rv).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(replay[1].kind, EventType::Modified);
        assert_eq!(store.watch_from(0).unwrap_err().code, 410);
        let gone = store.remove(&key(), "demo", "b").unwrap().unwrap();
        assert_eq!(gone.value()["metadata"]["resourceVersion"], "4");
        assert!(store.remove(&key(), "demo", "b").unwrap().is_none());
        store.compact();
        assert_eq!(store.watch_from(3).unwrap_err().code, 410);
        assert!(store.watch_from(4).unwrap().0.is_empty());
    }

    #[test]
    fn lists_in_order_by_namespace_and_after_a_key() {
        let mut store = Store::new(10);
        for (ns, name) in [("b", "x"), ("a", "z"), ("a", "y"), ("c", "w")] {
            store.put(&key(), ns, name, svc(name)).unwrap();
        }
        let names = |it: Listing<'_>| it.map(|((_, name), _)| name.clone()).collect::<Vec<_>>();
        assert_eq!(names(store.list(&key(), None, None)), ["y", "z", "x", "w"]);
        assert_eq!(names(store.list(&key(), Some("a"), None)), ["y", "z"]);
        assert_eq!(
            names(store.list(&key(), Some("a"), Some(("a".into(), "y".into())))),
            ["z"]
        );
        assert_eq!(
            names(store.list(&key(), None, Some(("a".into(), "z".into())))),
            ["x", "w"]
        );
    }

    #[test]
    fn persistence_survives_reopen_with_monotonic_versions() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = Store::open(dir.path(), 10).unwrap();
            store.put(&key(), "demo", "a", svc("a")).unwrap();
            store.put(&key(), "demo", "b", svc("b")).unwrap();
            store.remove(&key(), "demo", "a").unwrap();
        }
        // A torn final line, as after a crash mid-write.
        let path = dir.path().join("objects.jsonl");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"rv\": 9, \"gro");
        std::fs::write(&path, text).unwrap();

        let mut store = Store::open(dir.path(), 10).unwrap();
        assert_eq!(store.current_rv(), 3);
        assert!(store.get(&key(), "demo", "a").is_none());
        assert_eq!(
            store.get(&key(), "demo", "b").unwrap().value()["metadata"]["resourceVersion"],
            "2"
        );
        let c = store.put(&key(), "demo", "c", svc("c")).unwrap();
        assert_eq!(c.value()["metadata"]["resourceVersion"], "4");
        drop(store);
        let store = Store::open(dir.path(), 10).unwrap();
        assert_eq!(store.current_rv(), 4);
    }
}

#[cfg(test)]
mod object_tests {
    use super::*;

    #[test]
    fn an_object_keeps_its_labels_and_parses_back() {
        let value = json!({"apiVersion": "v1", "metadata": {"name": "a", "uid": "u", "labels": {"app": "echo"}}});
        let object = Object::from_value(&value);
        assert_eq!(object.label("app"), Some("echo"));
        assert_eq!(object.label("other"), None);
        assert_eq!(&*object.uid, "u");
        assert_eq!(&*object.api_version, "v1");
        assert_eq!(object.value(), value);
        assert_eq!(
            &event_line("ADDED", b"{}")[..],
            b"{\"type\":\"ADDED\",\"object\":{}}\n"
        );
    }
}
