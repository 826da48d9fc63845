//! The server's data: a tree of nodes with values and permissions, path syntax, and the
//! permission rules, all from Xen's `docs/misc/xenstore.txt`. No I/O here; the server
//! ([`super::server`]) owns one live tree and one snapshot per transaction.
//!
//! Every node carries a generation number, changed whenever the node's value, its
//! permissions or its list of children changes, and never reused (a removed and re-created
//! node gets a new one). Transactions compare the generations they saw at first use with
//! the live tree's at commit, which is how a conflict is found without comparing contents.

use std::collections::BTreeMap;

use crate::xen::xs_wire::{Access, Errno, Perm, XENSTORE_ABS_PATH_MAX, XENSTORE_REL_PATH_MAX};
use crate::xen::DomId;

/// One node: a value (possibly empty), permissions (owner first, never empty) and
/// children by name.
#[derive(Clone, Debug)]
pub(super) struct Node {
    pub value: Vec<u8>,
    pub perms: Vec<Perm>,
    pub gen: u64,
    pub children: BTreeMap<String, Node>,
}

impl Node {
    fn new(perms: Vec<Perm>, gen: u64) -> Node {
        Node {
            value: Vec::new(),
            perms,
            gen,
            children: BTreeMap::new(),
        }
    }

    /// Nodes in this subtree, this one included, owned by `domid`.
    fn count_owned(&self, domid: DomId) -> usize {
        let here = usize::from(self.perms.first().map(|p| p.domid) == Some(domid));
        here + self
            .children
            .values()
            .map(|c| c.count_owned(domid))
            .sum::<usize>()
    }

    /// Every path in this subtree (this node's `path` first) with its generation.
    fn collect(&self, path: &str, out: &mut Vec<(String, Option<u64>)>) {
        out.push((path.to_owned(), Some(self.gen)));
        for (name, child) in &self.children {
            child.collect(&join(path, name), out);
        }
    }
}

/// `parent/name`, minding the root.
pub(super) fn join(parent: &str, name: &str) -> String {
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

/// The components of a canonical absolute path (`/` has none).
pub(super) fn components(path: &str) -> Vec<&str> {
    path.split('/').filter(|c| !c.is_empty()).collect()
}

/// The parent of a canonical absolute path other than `/`.
pub(super) fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

/// Whether `child` is `parent` or below it, in `xenstore.txt`'s sense.
pub(super) fn is_child(child: &str, parent: &str) -> bool {
    parent == "/"
        || child == parent
        || (child.len() > parent.len()
            && child.starts_with(parent)
            && child.as_bytes()[parent.len()] == b'/')
}

/// `/local/domain/<domid>`, the base of a domain's relative paths.
pub(super) fn domain_path(domid: DomId) -> String {
    format!("/local/domain/{domid}")
}

/// Turns a path from `domid`'s request into a canonical absolute one, checking the syntax
/// of `xenstore.txt`: alphanumerics and `-/_@`, no empty components (doubled or trailing
/// slashes, except the root itself), and the `XENSTORE_*_PATH_MAX` lengths. Relative
/// paths are below `/local/domain/<domid>`. With `special`, `@`-paths (the watch-only
/// `@introduceDomain`, `@releaseDomain`) are let through as they are.
pub(super) fn resolve(path: &str, domid: DomId, special: bool) -> Result<String, Errno> {
    if path.is_empty() {
        return Err(Errno::EINVAL);
    }
    if special && path.starts_with('@') {
        if path.len() > XENSTORE_ABS_PATH_MAX || path.contains('\0') {
            return Err(Errno::EINVAL);
        }
        return Ok(path.to_owned());
    }
    // A path starts with `/` (absolute), `@` (special, watches only) or a component
    // (relative); C xenstored's `is_valid_nodename` has the same rule.
    if path.starts_with('@') {
        return Err(Errno::EINVAL);
    }
    let ok_chars = path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_' | b'@'));
    if !ok_chars {
        return Err(Errno::EINVAL);
    }
    let abs = if path.starts_with('/') {
        path.to_owned()
    } else {
        if path.len() > XENSTORE_REL_PATH_MAX {
            return Err(Errno::EINVAL);
        }
        format!("{}/{path}", domain_path(domid))
    };
    if abs.len() > XENSTORE_ABS_PATH_MAX {
        return Err(Errno::EINVAL);
    }
    if abs != "/" && (abs.ends_with('/') || abs.contains("//")) {
        return Err(Errno::EINVAL);
    }
    Ok(abs)
}

/// Whether `domid` may read (or, with `write`, write) a node with `perms`: dom0 always
/// (the control domain), the owner (first entry) always, anyone else as its own entry
/// says, or as the first entry's letter says when it has none (`xenstore.txt`).
pub(super) fn allowed(perms: &[Perm], domid: DomId, write: bool) -> bool {
    if domid == 0 {
        return true;
    }
    let Some(owner) = perms.first() else {
        return false;
    };
    if owner.domid == domid {
        return true;
    }
    let entry = perms[1..]
        .iter()
        .find(|p| p.domid == domid)
        .unwrap_or(owner);
    if write {
        entry.access.can_write()
    } else {
        entry.access.can_read()
    }
}

/// A node that changed, for the watches: its path, and the permissions that decide who
/// hears of it (the node's new ones, or its last ones if it was removed). `removed` marks
/// a removal, which also fires watches set below the path.
#[derive(Clone, Debug)]
pub(super) struct Change {
    pub path: String,
    pub perms: Vec<Perm>,
    pub removed: bool,
}

/// A whole store (the live one or a transaction's snapshot).
#[derive(Clone, Debug)]
pub(super) struct Tree {
    root: Node,
    /// The last generation handed out. Shared by snapshots through [`Tree::clone`] only as
    /// a starting point; what a snapshot numbers is never compared with the live tree.
    gen: u64,
}

impl Tree {
    /// A store holding only `/`, owned by dom0 and closed to everyone else (`n0`), as
    /// xenstored starts.
    pub fn new() -> Tree {
        Tree {
            root: Node::new(vec![Perm::new(Access::None, 0)], 1),
            gen: 1,
        }
    }

    fn bump(&mut self) -> u64 {
        self.gen += 1;
        self.gen
    }

    pub fn get(&self, path: &str) -> Option<&Node> {
        let mut node = &self.root;
        for c in components(path) {
            node = node.children.get(c)?;
        }
        Some(node)
    }

    fn get_mut(&mut self, path: &str) -> Option<&mut Node> {
        let mut node = &mut self.root;
        for c in components(path) {
            node = node.children.get_mut(c)?;
        }
        Some(node)
    }

    /// The generation of `path`, `None` if it does not exist.
    pub fn gen_of(&self, path: &str) -> Option<u64> {
        self.get(path).map(|n| n.gen)
    }

    /// The deepest existing node on the way to `path` (`path` itself if it exists) and
    /// its path.
    pub fn deepest(&self, path: &str) -> (String, &Node) {
        let mut node = &self.root;
        let mut at = String::from("/");
        for c in components(path) {
            match node.children.get(c) {
                Some(child) => {
                    node = child;
                    at = join(&at, c);
                }
                None => break,
            }
        }
        (at, node)
    }

    /// Nodes owned by `domid`, for its quota.
    pub fn count_owned(&self, domid: DomId) -> usize {
        self.root.count_owned(domid)
    }

    /// The nodes that creating `path` would add (`path` and its missing parents).
    pub fn missing(&self, path: &str) -> usize {
        let (at, _) = self.deepest(path);
        components(path).len() - components(&at).len()
    }

    /// The paths whose state an operation on `path` depends on or changes, with their
    /// generations now (`None`: absent). For an existing node: the node, and for a
    /// `removal` its whole subtree and its parent (whose children change). For a missing
    /// one: the path and its missing parents as absent, and the deepest existing node
    /// above (whose children a creation changes). A transaction records these at first
    /// use and compares them at commit.
    pub fn footprint(&self, path: &str, removal: bool) -> Vec<(String, Option<u64>)> {
        let mut out = Vec::new();
        match self.get(path) {
            Some(node) if removal => {
                node.collect(path, &mut out);
                if path != "/" {
                    let up = parent(path);
                    out.push((up.to_owned(), self.gen_of(up)));
                }
            }
            Some(node) => out.push((path.to_owned(), Some(node.gen))),
            None => {
                let (at, node) = self.deepest(path);
                let skip = components(&at).len();
                out.push((at.clone(), Some(node.gen)));
                let mut p = at;
                for c in components(path).into_iter().skip(skip) {
                    p = join(&p, c);
                    out.push((p.clone(), None));
                }
            }
        }
        out
    }

    /// Creates `path` and its missing parents. A new node inherits its parent's
    /// permissions, except that a node made by a domain other than dom0 is owned by that
    /// domain (C xenstored's rule, so a guest can always remove what it wrote). Returns
    /// the created paths, topmost first.
    fn create(&mut self, path: &str, creator: DomId) -> Vec<Change> {
        let mut created = Vec::new();
        let comps: Vec<String> = components(path).into_iter().map(str::to_owned).collect();
        let mut at = String::from("/");
        for c in &comps {
            let next = join(&at, c);
            if self.get(&next).is_none() {
                let gen_parent = self.bump();
                let gen_child = self.bump();
                let Some(parent_node) = self.get_mut(&at) else {
                    // Unreachable: `at` was created or found on the previous step.
                    break;
                };
                let mut perms = parent_node.perms.clone();
                if creator != 0 {
                    if let Some(owner) = perms.first_mut() {
                        owner.domid = creator;
                    }
                }
                parent_node.gen = gen_parent;
                parent_node
                    .children
                    .insert(c.clone(), Node::new(perms.clone(), gen_child));
                created.push(Change {
                    path: next.clone(),
                    perms,
                    removed: false,
                });
            }
            at = next;
        }
        created
    }

    /// Sets the value of `path`, creating it and its parents as needed. Only `path`
    /// fires: watches on the created parents match it anyway, as they match anything
    /// below them (xenstored fires the written path alone too).
    pub fn write(&mut self, path: &str, value: &[u8], creator: DomId) -> Vec<Change> {
        self.create(path, creator);
        let gen = self.bump();
        match self.get_mut(path) {
            Some(node) => {
                node.value = value.to_vec();
                node.gen = gen;
                vec![Change {
                    path: path.to_owned(),
                    perms: node.perms.clone(),
                    removed: false,
                }]
            }
            None => Vec::new(),
        }
    }

    /// Makes `path` exist; nothing changes (and nothing fires) if it does.
    pub fn mkdir(&mut self, path: &str, creator: DomId) -> Vec<Change> {
        let mut changes = self.create(path, creator);
        changes.retain(|c| c.path == path);
        changes
    }

    /// Removes `path` and its subtree; the caller has checked that it exists and is not
    /// the root.
    pub fn remove(&mut self, path: &str) -> Vec<Change> {
        let name = components(path).last().map(|s| (*s).to_owned());
        let gen = self.bump();
        let Some(name) = name else {
            return Vec::new();
        };
        let Some(parent_node) = self.get_mut(parent(path)) else {
            return Vec::new();
        };
        let Some(old) = parent_node.children.remove(&name) else {
            return Vec::new();
        };
        parent_node.gen = gen;
        vec![Change {
            path: path.to_owned(),
            perms: old.perms,
            removed: true,
        }]
    }

    /// Replaces the permissions of an existing `path`.
    pub fn set_perms(&mut self, path: &str, perms: &[Perm]) -> Vec<Change> {
        let gen = self.bump();
        match self.get_mut(path) {
            Some(node) => {
                node.perms = perms.to_vec();
                node.gen = gen;
                vec![Change {
                    path: path.to_owned(),
                    perms: perms.to_vec(),
                    removed: false,
                }]
            }
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_and_bad_ones_are_refused() {
        assert_eq!(resolve("/a/b", 5, false), Ok("/a/b".into()));
        assert_eq!(
            resolve("device/vif", 5, false),
            Ok("/local/domain/5/device/vif".into())
        );
        assert_eq!(resolve("/", 0, false), Ok("/".into()));
        for bad in ["", "/a/", "/a//b", "/a b", "/a\u{e9}", "a/"] {
            assert_eq!(resolve(bad, 0, false), Err(Errno::EINVAL), "{bad:?}");
        }
        assert_eq!(resolve("@introduceDomain", 0, false), Err(Errno::EINVAL));
        assert_eq!(
            resolve("@introduceDomain", 0, true),
            Ok("@introduceDomain".into())
        );
        assert!(resolve(&format!("/{}", "a".repeat(XENSTORE_ABS_PATH_MAX)), 0, false).is_err());
    }

    #[test]
    fn child_relation_is_by_component() {
        assert!(is_child("/a/b", "/a"));
        assert!(is_child("/a", "/a"));
        assert!(is_child("/a", "/"));
        assert!(!is_child("/ab", "/a"));
        assert!(!is_child("/a", "/a/b"));
        assert_eq!(parent("/a/b"), "/a");
        assert_eq!(parent("/a"), "/");
    }

    #[test]
    fn permissions_follow_xenstore_txt() {
        let p = [Perm::new(Access::None, 3), Perm::new(Access::Read, 5)];
        assert!(allowed(&p, 0, true), "dom0 may do anything");
        assert!(allowed(&p, 3, true), "the owner may do anything");
        assert!(allowed(&p, 5, false) && !allowed(&p, 5, true));
        assert!(
            !allowed(&p, 7, false),
            "others get the owner entry's letter: n"
        );
        let open = [Perm::new(Access::Both, 3)];
        assert!(allowed(&open, 7, true));
    }

    #[test]
    fn writes_create_parents_that_inherit_perms_and_generations_move() {
        let mut t = Tree::new();
        t.write("/a", b"", 0);
        t.set_perms(
            "/a",
            &[Perm::new(Access::None, 0), Perm::new(Access::Both, 5)],
        );
        let before = t.gen_of("/a");
        let ch = t.write("/a/b/c", b"v", 5);
        assert_eq!(ch.len(), 1);
        assert_eq!(ch[0].path, "/a/b/c");
        assert_ne!(t.gen_of("/a"), before, "a new child changes its parent");
        let b = t.get("/a/b").expect("parent created");
        assert_eq!(
            b.perms,
            [Perm::new(Access::None, 5), Perm::new(Access::Both, 5)]
        );
        assert_eq!(t.get("/a/b/c").expect("created").value, b"v");
        assert_eq!(t.count_owned(5), 2);
        assert_eq!(t.missing("/a/b/c/d/e"), 2);
        let g = t.gen_of("/a/b");
        t.remove("/a/b");
        assert!(t.get("/a/b/c").is_none());
        t.write("/a/b", b"", 0);
        assert_ne!(
            t.gen_of("/a/b"),
            g,
            "a re-created node has a new generation"
        );
    }
}
