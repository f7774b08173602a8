//! The ledger: an append-only file of signed, hash-chained receipts, one JSON line each.
//!
//! One writer thread owns the file. Appends queue on a channel; the writer takes everything
//! queued (group commit), chains and signs each receipt in order, writes them, calls
//! `fsync`, and only then acknowledges each append. A request's response names its receipt
//! only after that acknowledgement, so an acknowledged receipt survives a crash.
//!
//! Every line must be exactly the canonical encoding of what it holds, so any changed byte is
//! caught: it breaks the JSON, the canonical form, the hash, the chain link or the signature.
//! A receipt must also add up: its payments sum exactly (integer micro-units) to its
//! `total_micros`, so a receipt re-signed after an edit that breaks the sum is still caught.
//! A ledger re-signed entirely with another key is caught only against a pinned key
//! ([`verify_bytes`]'s `pinned_key`; the node serves its key at `GET /v1/attribution/key`).
//! On open, a torn last line (a crash mid-write) is cut off; damage anywhere else refuses to
//! open, naming the entry.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};

use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use super::receipt::{Attribution, InferenceRecord, Receipt, ReceiptBody};

/// A ledger or key problem.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The signing key is unusable.
    #[error("{path}: not an Ed25519 PKCS#8 key: {reason}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Another process (or another `Ledger` in this one) is appending to this ledger.
    #[error(
        "the ledger {path} is in use by {holder}: one ledger has one writer (stop the other server or `openlora generate --deployment` first)"
    )]
    Locked {
        /// The ledger.
        path: PathBuf,
        /// What the lock file says about the holder (`pid N`).
        holder: String,
    },
    /// The node key is not the one that signed the ledger.
    #[error(
        "the ledger {path} is signed by {ledger_key}, but this node's key is {node_key}: restore the node.key that signed it, or start a new ledger"
    )]
    WrongKey {
        /// The ledger.
        path: PathBuf,
        /// The key its receipts are signed with.
        ledger_key: String,
        /// The key given.
        node_key: String,
    },
    /// An entry failed verification.
    #[error("ledger entry {index} (line {line}): {reason}")]
    Bad {
        /// 0-based entry index.
        index: usize,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The writer is gone.
    #[error("the ledger writer has stopped")]
    Closed,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> LedgerError + '_ {
    move |source| LedgerError::Io { path: path.to_path_buf(), source }
}

/// Loads the node key from `path`, creating it (mode 0600) on first use.
pub fn load_or_create_key(path: &Path) -> Result<Ed25519KeyPair, LedgerError> {
    if !path.exists() {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| LedgerError::Key { path: path.to_path_buf(), reason: "key generation failed".into() })?;
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(path).map_err(io(path))?;
        f.write_all(pkcs8.as_ref()).map_err(io(path))?;
        f.sync_all().map_err(io(path))?;
    }
    let bytes = std::fs::read(path).map_err(io(path))?;
    Ed25519KeyPair::from_pkcs8(&bytes).map_err(|e| LedgerError::Key { path: path.to_path_buf(), reason: e.to_string() })
}

/// Checks one line (without its newline) against the expected position and previous hash;
/// returns the receipt.
fn check_line(line: &[u8], seq: u64, prev: &str, pinned_key: Option<&str>) -> Result<Receipt, String> {
    let r: Receipt = serde_json::from_slice(line).map_err(|e| format!("not a receipt: {e}"))?;
    let canonical = serde_json::to_vec(&r).map_err(|e| e.to_string())?;
    if canonical != line {
        return Err("not in canonical form (bytes were altered)".into());
    }
    if r.body.seq != seq {
        return Err(format!("sequence number {} where {seq} was expected", r.body.seq));
    }
    if r.body.prev != prev {
        return Err(format!("broken chain: prev is {}, the previous entry's hash is {prev}", r.body.prev));
    }
    verify_receipt(&r, pinned_key)?;
    Ok(r)
}

/// Checks one receipt on its own (not its place in a chain): its hash, its signature (by
/// `pinned_key` when given) and that its payments sum to its total.
pub fn verify_receipt(r: &Receipt, pinned_key: Option<&str>) -> Result<(), String> {
    let hash = r.body.hash();
    if hex::encode(hash) != r.hash {
        return Err("hash does not match the body".into());
    }
    if let Some(k) = pinned_key
        && r.body.node_key != k
    {
        return Err(format!("signed by key {}, not the pinned key {k}", r.body.node_key));
    }
    let key = hex::decode(&r.body.node_key).map_err(|e| format!("node_key: {e}"))?;
    let sig = hex::decode(&r.sig).map_err(|e| format!("sig: {e}"))?;
    // Hex must be lowercase: an upper-case digit decodes the same and would hide an edit.
    if hex::encode(&key) != r.body.node_key || hex::encode(&sig) != r.sig {
        return Err("node_key and sig must be lowercase hex".into());
    }
    UnparsedPublicKey::new(&ED25519, key).verify(&hash, &sig).map_err(|_| "bad signature".to_string())?;
    check_sum(&r.body.attribution).map_err(|e| format!("receipt {}: {e}", r.hash))
}

/// Whether the payments sum exactly to the total (micro-units are integers; summed in u128, so
/// no sum overflows).
fn check_sum(a: &Attribution) -> Result<(), String> {
    let sum: u128 = a.payments.iter().map(|p| u128::from(p.micros)).sum();
    if sum != u128::from(a.total_micros) {
        return Err(format!("payments sum to {sum} micros, but the receipt's total_micros is {}", a.total_micros));
    }
    Ok(())
}

/// The outcome of verifying a ledger file.
#[derive(Debug)]
pub struct Verified {
    /// Receipts that verified, in order.
    pub receipts: Vec<Receipt>,
    /// Byte length of the verified prefix.
    pub good_len: u64,
    /// The first failure, if any (the entries after it are not checked).
    pub error: Option<LedgerError>,
    /// Whether the failure is an incomplete last line (a torn write), which recovery may cut.
    pub torn_tail: bool,
}

/// Verifies every line of `data`: JSON, canonical form, sequence, chain, hash, signature,
/// payments summing to the total (and, with `pinned_key`, the signer).
///
/// Without `pinned_key`, signatures are checked against the key the ledger itself names (the
/// first receipt's, and every later one must match it): that proves the ledger is intact, not
/// who wrote it, since anyone can re-sign an edited ledger with a key of their own. Pin the
/// node's key (lowercase hex, as `GET /v1/attribution/key` serves it) to prove both.
pub fn verify_bytes(data: &[u8], pinned_key: Option<&str>) -> Verified {
    let mut receipts = Vec::new();
    let mut prev = "0".repeat(64);
    let mut pos = 0usize;
    let mut key: Option<String> = pinned_key.map(str::to_owned);
    while pos < data.len() {
        let index = receipts.len();
        let Some(nl) = data[pos..].iter().position(|&b| b == b'\n') else {
            return Verified {
                receipts,
                good_len: pos as u64,
                error: Some(LedgerError::Bad { index, line: index + 1, reason: "incomplete last line".into() }),
                torn_tail: true,
            };
        };
        let line = &data[pos..pos + nl];
        match check_line(line, index as u64, &prev, key.as_deref()) {
            Ok(r) => {
                prev.clone_from(&r.hash);
                key.get_or_insert_with(|| r.body.node_key.clone());
                receipts.push(r);
                pos += nl + 1;
            }
            Err(reason) => {
                let last = pos + nl + 1 == data.len();
                return Verified {
                    receipts,
                    good_len: pos as u64,
                    error: Some(LedgerError::Bad { index, line: index + 1, reason }),
                    torn_tail: last && serde_json::from_slice::<serde_json::Value>(line).is_err(),
                };
            }
        }
    }
    Verified { receipts, good_len: pos as u64, error: None, torn_tail: false }
}

/// Verifies the ledger file at `path`.
pub fn verify_file(path: &Path, pinned_key: Option<&str>) -> Result<Verified, LedgerError> {
    let data = std::fs::read(path).map_err(io(path))?;
    Ok(verify_bytes(&data, pinned_key))
}

struct Append {
    record: InferenceRecord,
    attribution: Attribution,
    ack: tokio::sync::oneshot::Sender<Result<String, String>>,
}

#[derive(Default)]
struct Index {
    /// Receipt id -> (offset, length, tenant).
    by_id: HashMap<String, (u64, usize, String)>,
    count: u64,
}

/// The ledger, open for appending: one writer thread behind it and the ledger's lock held
/// until it is dropped (share it behind an `Arc`).
pub struct Ledger {
    /// `None` once dropping.
    tx: Option<Sender<Append>>,
    /// The writer thread; joined on drop, so the lock is released when the `Ledger` is gone.
    writer: Option<std::thread::JoinHandle<()>>,
    index: Arc<Mutex<Index>>,
    path: PathBuf,
    public_key: String,
}

impl Ledger {
    /// Opens (or creates) the ledger at `path`, signing with `key`. A torn last line is cut
    /// off; any other damage is an error naming the entry. The ledger is locked for as long as
    /// the `Ledger` lives (an exclusive lock on `PATH.lock`, which names the holder): a second
    /// writer is refused with [`LedgerError::Locked`]. A key other than the one that signed the
    /// existing receipts is refused with [`LedgerError::WrongKey`], naming both. The ledger and
    /// its lock file are readable by their owner only.
    pub fn open(path: &Path, key: Ed25519KeyPair) -> Result<Self, LedgerError> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
            && !dir.exists()
        {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            private(dir, 0o700).map_err(io(dir))?;
        }
        let lock = take_lock(path)?;
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(path).map_err(io(path))?;
        private(path, 0o600).map_err(io(path))?;
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(io(path))?;
        let v = verify_bytes(&data, None);
        // Refuse a foreign key before touching the file (even to cut a torn tail).
        let public_key = hex::encode(key.public_key().as_ref());
        if let Some(last) = v.receipts.last()
            && last.body.node_key != public_key
        {
            return Err(LedgerError::WrongKey {
                path: path.to_path_buf(),
                ledger_key: last.body.node_key.clone(),
                node_key: public_key,
            });
        }
        if let Some(e) = v.error {
            if !v.torn_tail {
                return Err(e);
            }
            eprintln!(
                "openlora: ledger {}: cutting an incomplete last entry ({} bytes) left by a crash",
                path.display(),
                data.len() as u64 - v.good_len
            );
            file.set_len(v.good_len).map_err(io(path))?;
            file.sync_all().map_err(io(path))?;
        }
        let mut index = Index::default();
        let mut offset = 0u64;
        for r in &v.receipts {
            let len = serde_json::to_vec(r).map(|b| b.len()).unwrap_or(0) + 1;
            index.by_id.insert(r.hash.clone(), (offset, len, r.body.record.tenant.clone()));
            offset += len as u64;
        }
        index.count = v.receipts.len() as u64;
        let prev = v.receipts.last().map_or_else(|| "0".repeat(64), |r| r.hash.clone());
        let index = Arc::new(Mutex::new(index));
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = Writer {
            file,
            path: path.to_path_buf(),
            key,
            public_key: public_key.clone(),
            prev,
            seq: v.receipts.len() as u64,
            offset,
            index: index.clone(),
            _lock: lock,
        };
        let writer = std::thread::Builder::new()
            .name("openlora-ledger".into())
            .spawn(move || writer.run(rx))
            .map_err(io(path))?;
        Ok(Self { tx: Some(tx), writer: Some(writer), index, path: path.to_path_buf(), public_key })
    }

    /// The node's public key, hex.
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Receipts written.
    pub fn len(&self) -> u64 {
        self.index.lock().unwrap_or_else(PoisonError::into_inner).count
    }

    /// Whether no receipt is written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queues a receipt; the returned channel yields its id once it is on disk (fsync'd). An
    /// attribution whose payments do not sum to its total is refused (verification, and so the
    /// next open, would refuse the ledger holding it).
    pub fn append(
        &self,
        record: InferenceRecord,
        attribution: Attribution,
    ) -> tokio::sync::oneshot::Receiver<Result<String, String>> {
        let (ack, rx) = tokio::sync::oneshot::channel();
        if let Err(e) = check_sum(&attribution) {
            let _ = ack.send(Err(format!("refusing to sign the receipt of {}: {e}", record.request_id)));
            return rx;
        }
        let sent = match &self.tx {
            Some(tx) => tx.send(Append { record, attribution, ack }).map_err(|e| e.0),
            None => Err(Append { record, attribution, ack }),
        };
        if let Err(e) = sent {
            let _ = e.ack.send(Err(LedgerError::Closed.to_string()));
        }
        rx
    }

    /// Appends and waits (blocking) for the id.
    pub fn append_blocking(&self, record: InferenceRecord, attribution: Attribution) -> Result<String, String> {
        self.append(record, attribution).blocking_recv().map_err(|_| LedgerError::Closed.to_string())?
    }

    /// The receipt `id` and the tenant it belongs to.
    pub fn get(&self, id: &str) -> Result<Option<(Receipt, String)>, LedgerError> {
        let Some((offset, len, tenant)) =
            self.index.lock().unwrap_or_else(PoisonError::into_inner).by_id.get(id).cloned()
        else {
            return Ok(None);
        };
        let mut f = File::open(&self.path).map_err(io(&self.path))?;
        f.seek(SeekFrom::Start(offset)).map_err(io(&self.path))?;
        let mut buf = vec![0; len];
        f.read_exact(&mut buf).map_err(io(&self.path))?;
        let r: Receipt = serde_json::from_slice(buf.trim_ascii_end()).map_err(|e| LedgerError::Bad {
            index: 0,
            line: 0,
            reason: e.to_string(),
        })?;
        Ok(Some((r, tenant)))
    }
}

struct Writer {
    file: File,
    path: PathBuf,
    key: Ed25519KeyPair,
    public_key: String,
    prev: String,
    seq: u64,
    offset: u64,
    index: Arc<Mutex<Index>>,
    /// Held (locked) while the writer runs.
    _lock: File,
}

impl Drop for Ledger {
    fn drop(&mut self) {
        // Closing the channel lets the writer finish what is queued; joining it releases the
        // lock before the next `open` of this ledger can look.
        self.tx = None;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// Takes the exclusive lock on `PATH.lock` and writes our pid in it; a held lock is
/// [`LedgerError::Locked`] naming its holder. The lock is the OS's (released when the process
/// dies, SIGKILL included), so a stale lock file never blocks a restart.
fn take_lock(path: &Path) -> Result<File, LedgerError> {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".lock");
    let lock_path = path.with_file_name(name);
    let mut lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(io(&lock_path))?;
    private(&lock_path, 0o600).map_err(io(&lock_path))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = lock.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(LedgerError::Locked {
                path: path.to_path_buf(),
                holder: if holder.is_empty() { "another process".to_owned() } else { holder.to_owned() },
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
    }
    lock.set_len(0).map_err(io(&lock_path))?;
    lock.seek(SeekFrom::Start(0)).map_err(io(&lock_path))?;
    lock.write_all(format!("pid {}\n", std::process::id()).as_bytes()).map_err(io(&lock_path))?;
    lock.sync_all().map_err(io(&lock_path))?;
    Ok(lock)
}

/// Restricts `path` to its owner (`mode` 0o600 for files, 0o700 for folders) on Unix.
fn private(path: &Path, mode: u32) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    }
    #[cfg(not(unix))]
    {
        let _ = (path, mode);
        Ok(())
    }
}

impl Writer {
    fn run(mut self, rx: Receiver<Append>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            let mut out = Vec::new();
            let mut done = Vec::with_capacity(batch.len());
            let (prev0, seq0, offset0) = (self.prev.clone(), self.seq, self.offset);
            for a in batch {
                let body = ReceiptBody {
                    seq: self.seq,
                    prev: self.prev.clone(),
                    node_key: self.public_key.clone(),
                    record: a.record,
                    attribution: a.attribution,
                };
                let hash = body.hash();
                let sig = self.key.sign(&hash);
                let r = Receipt { body, hash: hex::encode(hash), sig: hex::encode(sig.as_ref()) };
                let mut line = serde_json::to_vec(&r).unwrap_or_default();
                line.push(b'\n');
                done.push((r.hash.clone(), self.offset, line.len(), r.body.record.tenant.clone(), a.ack));
                self.offset += line.len() as u64;
                self.prev = r.hash;
                self.seq += 1;
                out.extend(line);
            }
            let written = self.file.write_all(&out).and_then(|()| self.file.sync_data());
            match written {
                Ok(()) => {
                    let mut idx = self.index.lock().unwrap_or_else(PoisonError::into_inner);
                    for (id, off, len, tenant, ack) in done {
                        idx.by_id.insert(id.clone(), (off, len, tenant));
                        idx.count += 1;
                        let _ = ack.send(Ok(id));
                    }
                }
                Err(e) => {
                    // Undo: nothing of this batch is acknowledged; cut what may have been written.
                    let _ = self.file.set_len(offset0);
                    self.prev = prev0;
                    self.seq = seq0;
                    self.offset = offset0;
                    let msg = format!("{}: {e}", self.path.display());
                    for (_, _, _, _, ack) in done {
                        let _ = ack.send(Err(msg.clone()));
                    }
                }
            }
        }
    }
}
