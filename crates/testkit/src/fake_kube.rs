//! A Kubernetes API server stand-in that speaks the list/watch protocol
//! over HTTP/1.1: lists carry a resourceVersion; watches stream events
//! after the one asked for, send bookmarks, and answer a resourceVersion
//! older than the last compaction with a `410 Gone` ERROR event, as the
//! real server does. Also takes server-side-apply PATCHes (main resource
//! and `/status` subresource) and DELETEs of MCS objects, applies them as
//! watch events and records them, and serves Leases (GET, POST, PUT with resourceVersion
//! conflicts) and merge PATCHes of Pods' labels, for leader election, and
//! ConfigMaps (GET, PUT with resourceVersion conflicts), for CoreDNS's.
//! Only what fedmesh uses is implemented.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Resource kinds by URL path (all-namespace collections).
const KINDS: &[(&str, &str, &str)] = &[
    ("/api/v1/services", "v1", "Service"),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "discovery.k8s.io/v1",
        "EndpointSlice",
    ),
    (
        "/apis/multicluster.x-k8s.io/v1beta1/serviceexports",
        "multicluster.x-k8s.io/v1beta1",
        "ServiceExport",
    ),
    (
        "/apis/multicluster.x-k8s.io/v1beta1/serviceimports",
        "multicluster.x-k8s.io/v1beta1",
        "ServiceImport",
    ),
];

/// The MCS API's stored version and the older one still served: as with
/// the CRDs `fedmesh install` renders, a request for the old version reads
/// and writes the same objects.
const MCS_STORED: &str = "/apis/multicluster.x-k8s.io/v1beta1/";
const MCS_SERVED: &str = "/apis/multicluster.x-k8s.io/v1alpha1/";

/// `path` with a served-only MCS version replaced by the stored one.
fn stored_path(path: &str) -> String {
    match path.strip_prefix(MCS_SERVED) {
        Some(rest) => format!("{MCS_STORED}{rest}"),
        None => path.to_owned(),
    }
}

/// A write the server received.
#[derive(Debug, Clone)]
pub struct Write {
    pub method: String,
    pub path: String,
    pub body: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Objects by kind path, then `ns/name`.
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    /// Events by kind path: (resourceVersion, type, object).
    events: BTreeMap<String, Vec<(u64, String, Value)>>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted_below: u64,
    /// Every request line, in order.
    requests: Vec<String>,
    /// Every request's `User-Agent` (empty when it sent none).
    user_agents: Vec<String>,
    writes: Vec<Write>,
    /// Kind paths whose lists are held back until released.
    held: Vec<String>,
    /// A broken event to send once on the next watch of a kind path.
    poison: Option<String>,
    /// Single objects by their full path (Leases, Pods).
    singles: BTreeMap<String, Value>,
    /// Requests answered 503 from now on (an unreachable API server).
    down: bool,
    /// Tokens the TokenReview endpoint vouches for: token → (username,
    /// audiences).
    tokens: BTreeMap<String, (String, Vec<String>)>,
}

/// The running fake. Dropping it stops accepting; open watches end.
pub struct FakeKube {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// Bumped on every change (and to end every open watch).
    tick: watch::Sender<(u64, u64)>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn meta(o: &Value) -> (String, String) {
    let m = &o["metadata"];
    (
        m["namespace"].as_str().unwrap_or_default().to_owned(),
        m["name"].as_str().unwrap_or_default().to_owned(),
    )
}

fn kind_of(path: &str) -> Option<(&'static str, &'static str, &'static str)> {
    KINDS.iter().copied().find(|(p, _, _)| *p == path)
}

impl FakeKube {
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let (tick, _) = watch::channel((0u64, 0u64));
        let (s, t) = (state.clone(), tick.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (s, t) = (s.clone(), t.clone());
                tokio::spawn(async move {
                    let _ = serve(stream, s, t).await;
                });
            }
        });
        Ok(Self {
            addr,
            state,
            tick,
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.tick.send_modify(|t| t.0 += 1);
    }

    /// Creates or replaces an object of the kind at `kind_path`.
    pub fn put(&self, kind_path: &str, mut obj: Value) {
        let kind_path = &stored_path(kind_path);
        {
            let mut st = self.lock();
            st.rv += 1;
            let rv = st.rv;
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            let (ns, name) = meta(&obj);
            let key = format!("{ns}/{name}");
            let objects = st.objects.entry(kind_path.to_owned()).or_default();
            let kind = if objects.insert(key, obj.clone()).is_some() {
                "MODIFIED"
            } else {
                "ADDED"
            };
            st.events
                .entry(kind_path.to_owned())
                .or_default()
                .push((rv, kind.into(), obj));
        }
        self.changed();
    }

    pub fn delete(&self, kind_path: &str, ns: &str, name: &str) {
        let kind_path = &stored_path(kind_path);
        {
            let mut st = self.lock();
            st.rv += 1;
            let rv = st.rv;
            if let Some(mut obj) = st
                .objects
                .entry(kind_path.to_owned())
                .or_default()
                .remove(&format!("{ns}/{name}"))
            {
                obj["metadata"]["resourceVersion"] = json!(rv.to_string());
                st.events.entry(kind_path.to_owned()).or_default().push((
                    rv,
                    "DELETED".into(),
                    obj,
                ));
            }
        }
        self.changed();
    }

    /// Forgets the event history: watches from before now get 410 Gone.
    pub fn compact(&self) {
        let mut st = self.lock();
        st.compacted_below = st.rv + 1;
        st.events.clear();
    }

    /// Ends every open watch (as an API server restart or timeout does).
    pub fn break_watches(&self) {
        self.tick.send_modify(|t| t.1 += 1);
    }

    /// Holds lists of `kind_path` until [`release`](Self::release).
    pub fn hold(&self, kind_path: &str) {
        self.lock().held.push(stored_path(kind_path));
    }

    pub fn release(&self) {
        self.lock().held.clear();
        self.changed();
    }

    /// The next watch of `kind_path` gets one undecodable event first.
    pub fn poison_next_watch(&self, kind_path: &str) {
        self.lock().poison = Some(stored_path(kind_path));
    }

    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    /// The `User-Agent` of every request so far, in order.
    pub fn user_agents(&self) -> Vec<String> {
        self.lock().user_agents.clone()
    }

    pub fn writes(&self) -> Vec<Write> {
        self.lock().writes.clone()
    }

    /// The object `ns/name` of the kind at `kind_path`.
    pub fn get(&self, kind_path: &str, ns: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&stored_path(kind_path))?
            .get(&format!("{ns}/{name}"))
            .cloned()
    }

    /// The object at `path` (a Lease's or a Pod's full API path).
    pub fn object(&self, path: &str) -> Option<Value> {
        self.lock().singles.get(path).cloned()
    }

    /// Puts (or replaces, as an edit by someone else would) ConfigMap
    /// `ns/name` with `data`, at a new resourceVersion.
    pub fn put_configmap(&self, ns: &str, name: &str, data: Value) {
        let path = format!("/api/v1/namespaces/{ns}/configmaps/{name}");
        let mut st = self.lock();
        st.rv += 1;
        let cm = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": { "name": name, "namespace": ns, "resourceVersion": st.rv.to_string() },
            "data": data,
        });
        st.singles.insert(path, cm);
    }

    /// Puts a Pod, so its labels can be patched.
    pub fn put_pod(&self, ns: &str, name: &str) {
        let path = format!("/api/v1/namespaces/{ns}/pods/{name}");
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "namespace": ns, "labels": {}, "resourceVersion": "1" },
        });
        self.lock().singles.insert(path, pod);
    }

    /// Makes TokenReviews of `token` say it belongs to `username` and
    /// was minted for `audiences`.
    pub fn allow_token(&self, token: &str, username: &str, audiences: &[&str]) {
        self.lock().tokens.insert(
            token.into(),
            (
                username.into(),
                audiences.iter().map(|a| (*a).to_owned()).collect(),
            ),
        );
    }

    /// Every request answered 503 (`true`) or served again (`false`).
    pub fn set_down(&self, down: bool) {
        self.lock().down = down;
    }

    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }
}

const MAX_HEAD: usize = 64 * 1024;

async fn serve(
    stream: TcpStream,
    state: Arc<Mutex<State>>,
    tick: watch::Sender<(u64, u64)>,
) -> std::io::Result<()> {
    let mut stream = BufReader::new(stream);
    loop {
        // Request head.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let b = match stream.read_u8().await {
                Ok(b) => b,
                Err(_) => return Ok(()),
            };
            head.push(b);
            if head.len() > MAX_HEAD {
                return Ok(());
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let mut lines = head.split("\r\n");
        let line = lines.next().unwrap_or_default().to_owned();
        let mut parts = line.split(' ');
        let method = parts.next().unwrap_or_default().to_owned();
        let target = parts.next().unwrap_or_default().to_owned();
        let headers: Vec<(&str, &str)> = lines.filter_map(|l| l.split_once(':')).collect();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim())
        };
        let len = header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        let agent = header("user-agent").unwrap_or_default().to_owned();
        let mut body = vec![0u8; len.min(1 << 20)];
        stream.read_exact(&mut body).await?;
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let path = &stored_path(path);
        let q: BTreeMap<&str, &str> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .collect();
        {
            let mut st = lock(&state);
            st.requests.push(format!("{method} {target}"));
            st.user_agents.push(agent);
        }
        if lock(&state).down {
            respond(
                stream.get_mut(),
                503,
                &status(503, "ServiceUnavailable", "down"),
            )
            .await?;
            continue;
        }
        if method == "POST" && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
            let review: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let answer = token_review(&state, &review);
            respond(stream.get_mut(), 201, &answer).await?;
            continue;
        }
        if let Some((code, obj)) = single(&state, &method, path, &body) {
            respond(stream.get_mut(), code, &obj).await?;
            continue;
        }

        match (method.as_str(), kind_of(path)) {
            ("GET", Some(kind))
                if q.get("watch") == Some(&"true") || q.get("watch") == Some(&"1") =>
            {
                let from = q
                    .get("resourceVersion")
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
                watch_stream(stream.get_mut(), &state, &tick, kind, from).await?;
                return Ok(());
            }
            ("GET", Some((kpath, api_version, kind))) => {
                // Held lists wait (bounded) for a release.
                for _ in 0..600 {
                    if !lock(&state).held.iter().any(|h| h == kpath) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let selector = q.get("labelSelector").map(|s| s.replace("%3D", "="));
                let list = {
                    let st = lock(&state);
                    let items: Vec<Value> = st
                        .objects
                        .get(kpath)
                        .into_iter()
                        .flat_map(|m| m.values())
                        .filter(|o| match &selector {
                            Some(sel) => sel.split(',').all(|kv| {
                                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                                o["metadata"]["labels"][k] == json!(v)
                            }),
                            None => true,
                        })
                        .cloned()
                        .collect();
                    json!({
                        "apiVersion": api_version,
                        "kind": format!("{kind}List"),
                        "metadata": { "resourceVersion": st.rv.to_string() },
                        "items": items,
                    })
                };
                respond(stream.get_mut(), 200, &list).await?;
            }
            ("PATCH", _) | ("DELETE", _) => {
                let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let answer = mcs_write(&state, &method, path, value);
                if answer.is_some() {
                    tick.send_modify(|t| t.0 += 1);
                }
                match answer {
                    Some(o) => respond(stream.get_mut(), 200, &o).await?,
                    None => {
                        respond(stream.get_mut(), 404, &status(404, "NotFound", "not found"))
                            .await?
                    }
                }
            }
            _ => {
                respond(
                    stream.get_mut(),
                    404,
                    &status(404, "NotFound", "no such path"),
                )
                .await?
            }
        }
    }
}

/// A server-side apply PATCH or a DELETE of an MCS object
/// (`.../namespaces/NS/PLURAL/NAME[/status]`), as the API server does it
/// for a CRD with a status subresource: the main resource ignores
/// `status`, `/status` changes only `status` (and 404s for an object that
/// does not exist); objects merge key by key and lists are replaced (the
/// field ownership that lets apply remove fields is not modelled). Every
/// change is a watch event. Returns the object written, or `None` (404).
fn mcs_write(state: &Mutex<State>, method: &str, path: &str, value: Value) -> Option<Value> {
    let mut st = lock(state);
    st.writes.push(Write {
        method: method.to_owned(),
        path: path.to_owned(),
        body: value.clone(),
    });
    let path = stored_path(path);
    let segs: Vec<&str> = path.split('/').collect();
    let i = segs.iter().position(|s| *s == "namespaces")?;
    let (ns, plural, name) = (segs.get(i + 1)?, segs.get(i + 2)?, segs.get(i + 3)?);
    let sub = segs.get(i + 4).copied();
    let kpath = format!("{MCS_STORED}{plural}");
    let key = format!("{ns}/{name}");
    st.rv += 1;
    let rv = st.rv;
    let current = st.objects.get(&kpath).and_then(|m| m.get(&key)).cloned();
    let (kind, mut obj) = match (method, sub, current) {
        ("DELETE", None, Some(mut o)) => {
            st.objects.entry(kpath.clone()).or_default().remove(&key);
            o["metadata"]["resourceVersion"] = json!(rv.to_string());
            st.events
                .entry(kpath)
                .or_default()
                .push((rv, "DELETED".into(), o.clone()));
            return Some(o);
        }
        ("PATCH", Some("status"), Some(mut o)) => {
            merge(&mut o["status"], &value["status"]);
            ("MODIFIED", o)
        }
        ("PATCH", None, current) => {
            let mut patch = value;
            if let Some(m) = patch.as_object_mut() {
                m.remove("status");
            }
            match current {
                Some(mut o) => {
                    merge(&mut o, &patch);
                    ("MODIFIED", o)
                }
                None => {
                    patch["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
                    ("ADDED", patch)
                }
            }
        }
        _ => return None,
    };
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    obj["metadata"]["namespace"] = json!(ns);
    obj["metadata"]["name"] = json!(name);
    st.objects
        .entry(kpath.clone())
        .or_default()
        .insert(key, obj.clone());
    st.events
        .entry(kpath)
        .or_default()
        .push((rv, kind.into(), obj.clone()));
    Some(obj)
}

/// `patch` into `into`: objects key by key, anything else replaced.
pub fn merge(into: &mut Value, patch: &Value) {
    match (into, patch) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b.clone(),
    }
}

/// A TokenReview as the API server answers it: authenticated only for a
/// known token whose audiences include one asked for.
fn token_review(state: &Mutex<State>, review: &Value) -> Value {
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<&str> = review["spec"]["audiences"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let st = lock(state);
    let status = match st.tokens.get(token) {
        Some((user, auds))
            if wanted.is_empty() || wanted.iter().any(|w| auds.iter().any(|a| a == w)) =>
        {
            json!({
                "authenticated": true,
                "user": { "username": user },
                "audiences": auds.iter().filter(|a| wanted.is_empty() || wanted.contains(&a.as_str())).collect::<Vec<_>>(),
            })
        }
        Some(_) => json!({ "authenticated": false, "error": "token audiences do not match" }),
        None => json!({ "authenticated": false, "error": "invalid bearer token" }),
    };
    json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
        "metadata": {}, "spec": review["spec"], "status": status,
    })
}

/// Leases and Pods: one object per path, optimistic concurrency on PUT.
fn single(state: &Mutex<State>, method: &str, path: &str, body: &[u8]) -> Option<(u16, Value)> {
    const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/";
    let is_lease = path.starts_with(LEASES) && path.contains("/leases");
    let is_pod = path.starts_with("/api/v1/namespaces/") && path.contains("/pods/");
    let is_configmap = path.starts_with("/api/v1/namespaces/") && path.contains("/configmaps/");
    if !is_lease && !is_pod && !is_configmap {
        return None;
    }
    let mut st = lock(state);
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let not_found = (404, status(404, "NotFound", "not found"));
    Some(match method {
        "GET" => match st.singles.get(path) {
            Some(o) => (200, o.clone()),
            None => not_found,
        },
        "POST" if is_lease && path.ends_with("/leases") => {
            let name = value["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let full = format!("{path}/{name}");
            if st.singles.contains_key(&full) {
                (409, status(409, "AlreadyExists", "lease exists"))
            } else {
                st.rv += 1;
                let mut o = value;
                o["metadata"]["resourceVersion"] = json!(st.rv.to_string());
                st.singles.insert(full, o.clone());
                (201, o)
            }
        }
        "PUT" if is_lease || is_configmap => {
            if is_configmap {
                st.writes.push(Write {
                    method: method.into(),
                    path: path.into(),
                    body: value.clone(),
                });
            }
            let current = st
                .singles
                .get(path)
                .map(|o| o["metadata"]["resourceVersion"].clone());
            match current {
                None => not_found,
                Some(rv) if rv != value["metadata"]["resourceVersion"] => {
                    (409, status(409, "Conflict", "the object has been modified"))
                }
                Some(_) => {
                    st.rv += 1;
                    let mut o = value;
                    o["metadata"]["resourceVersion"] = json!(st.rv.to_string());
                    st.singles.insert(path.to_owned(), o.clone());
                    (200, o)
                }
            }
        }
        "PATCH" if is_pod => {
            st.writes.push(Write {
                method: method.into(),
                path: path.into(),
                body: value.clone(),
            });
            match st.singles.get_mut(path) {
                Some(o) => {
                    if let Some(labels) = value["metadata"]["labels"].as_object() {
                        for (k, v) in labels {
                            o["metadata"]["labels"][k] = v.clone();
                        }
                    }
                    (200, o.clone())
                }
                None => not_found,
            }
        }
        _ => (
            405,
            status(405, "MethodNotAllowed", "not supported by the fake"),
        ),
    })
}

fn lock(s: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

async fn respond(s: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let body = serde_json::to_vec(body).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(&body).await
}

async fn chunk(s: &mut TcpStream, line: &[u8]) -> std::io::Result<()> {
    s.write_all(format!("{:x}\r\n", line.len() + 1).as_bytes())
        .await?;
    s.write_all(line).await?;
    s.write_all(b"\n\r\n").await
}

async fn watch_stream(
    s: &mut TcpStream,
    state: &Mutex<State>,
    tick: &watch::Sender<(u64, u64)>,
    (kpath, api_version, kind): (&str, &str, &str),
    from: u64,
) -> std::io::Result<()> {
    s.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    )
    .await?;
    let mut rx = tick.subscribe();
    let generation = rx.borrow_and_update().1;
    let mut sent = from;
    let (gone, poisoned) = {
        let mut st = lock(state);
        let poisoned = st.poison.as_deref() == Some(kpath);
        if poisoned {
            st.poison = None;
        }
        (from < st.compacted_below, poisoned)
    };
    if gone {
        let ev = json!({ "type": "ERROR", "object": status(410, "Expired", "too old resource version") });
        chunk(s, &serde_json::to_vec(&ev).unwrap_or_default()).await?;
        return s.write_all(b"0\r\n\r\n").await;
    }
    if poisoned {
        // Complete JSON of the wrong shape (a truncated line would be
        // taken for an incomplete read and skipped).
        chunk(
            s,
            br#"{"type":"ADDED","object":{"kind":"Service","metadata":{"name":5}}}"#,
        )
        .await?;
    }
    // Bounded: a watch lasts at most a minute here (real servers time out too).
    for _ in 0..1200 {
        let pending: Vec<(u64, Value)> = {
            let st = lock(state);
            st.events
                .get(kpath)
                .into_iter()
                .flatten()
                .filter(|(rv, _, _)| *rv > sent)
                .map(|(rv, t, o)| (*rv, json!({ "type": t, "object": o })))
                .collect()
        };
        if let Some((rv, _)) = pending.last() {
            sent = *rv;
        }
        let pending = pending.into_iter().map(|(_, ev)| ev);
        for ev in pending {
            chunk(s, &serde_json::to_vec(&ev).unwrap_or_default()).await?;
        }
        // A bookmark moves the client's resourceVersion on without events.
        let rv = { lock(state).rv };
        if rv > sent {
            sent = rv;
            let bm = json!({
                "type": "BOOKMARK",
                "object": { "apiVersion": api_version, "kind": kind, "metadata": { "resourceVersion": rv.to_string() } },
            });
            chunk(s, &serde_json::to_vec(&bm).unwrap_or_default()).await?;
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), rx.changed()).await;
        if rx.borrow_and_update().1 != generation {
            break;
        }
    }
    s.write_all(b"0\r\n\r\n").await
}
