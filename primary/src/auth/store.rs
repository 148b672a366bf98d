//! The auth state in the state database, beside the MVCC tables: written
//! in the same SQLite transaction as the applied index, so it is exactly as
//! durable as the keys, and copied with them into Raft snapshots, learner
//! backups and restores.
//!
//! Tables (see `about` in the database): `auth_users`, `auth_roles`,
//! `auth_permissions`; `meta` rows `auth_enabled` and `auth_revision`.
//! The tables are small, so an auth entry rewrites them whole: one code
//! path, no partial update to get wrong.

use rusqlite::{params, Connection, OptionalExtension};

use super::state::{AuthState, Role, User};
use crate::proto::authpb::Permission;

pub const TABLES: &str = r#"
CREATE TABLE IF NOT EXISTS auth_users (
    name          TEXT    PRIMARY KEY,
    password_hash TEXT    NOT NULL,
    no_password   INTEGER NOT NULL,
    roles         TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS auth_roles (
    name TEXT PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS auth_permissions (
    role      TEXT    NOT NULL,
    position  INTEGER NOT NULL,
    key       BLOB    NOT NULL,
    range_end BLOB    NOT NULL,
    perm_type INTEGER NOT NULL,
    PRIMARY KEY (role, position)
);
"#;

pub const ABOUT: &[(&str, &str)] = &[
    ("auth_users", "etcd auth users: name, bcrypt password hash (empty with no_password=1), granted roles (JSON array, sorted). meta auth_enabled=1 when auth is on; meta auth_revision counts auth changes."),
    ("auth_roles", "etcd auth roles by name; their key permissions are in auth_permissions. The role 'root' may be granted without existing here."),
    ("auth_permissions", "Key permissions per role, in key order: [key, range_end) where an empty range_end is the single key and range_end = x'00' means every key from key on; perm_type 0 = READ, 1 = WRITE, 2 = READWRITE."),
];

fn meta(conn: &Connection, name: &str) -> Result<i64, rusqlite::Error> {
    Ok(conn
        .query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?
        .unwrap_or(0))
}

/// Read the whole auth state.
pub fn load(conn: &Connection) -> Result<AuthState, rusqlite::Error> {
    let mut state = AuthState {
        enabled: meta(conn, "auth_enabled")? != 0,
        revision: meta(conn, "auth_revision")? as u64,
        ..Default::default()
    };
    let mut users =
        conn.prepare("SELECT name, password_hash, no_password, roles FROM auth_users")?;
    let rows = users.query_map([], |r| {
        let roles: String = r.get(3)?;
        Ok((
            r.get::<_, String>(0)?,
            User {
                password_hash: r.get(1)?,
                no_password: r.get::<_, i64>(2)? != 0,
                roles: serde_json::from_str(&roles).unwrap_or_default(),
            },
        ))
    })?;
    for row in rows {
        let (name, user) = row?;
        state.users.insert(name, user);
    }
    let mut roles = conn.prepare("SELECT name FROM auth_roles")?;
    for name in roles.query_map([], |r| r.get::<_, String>(0))? {
        state.roles.insert(name?, Role::default());
    }
    let mut perms = conn.prepare(
        "SELECT role, key, range_end, perm_type FROM auth_permissions ORDER BY role, position",
    )?;
    let rows = perms.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            Permission {
                key: r.get(1)?,
                range_end: r.get(2)?,
                perm_type: r.get(3)?,
            },
        ))
    })?;
    for row in rows {
        let (role, perm) = row?;
        if let Some(role) = state.roles.get_mut(&role) {
            role.permissions.push(perm);
        }
    }
    Ok(state)
}

/// Replace the stored auth state with `state`.
pub fn save(conn: &Connection, state: &AuthState) -> Result<(), rusqlite::Error> {
    conn.execute_batch(
        "DELETE FROM auth_users; DELETE FROM auth_roles; DELETE FROM auth_permissions;",
    )?;
    let mut user = conn.prepare_cached(
        "INSERT INTO auth_users (name, password_hash, no_password, roles) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for (name, u) in &state.users {
        let roles = serde_json::to_string(&u.roles).unwrap_or_else(|_| "[]".into());
        user.execute(params![name, u.password_hash, u.no_password, roles])?;
    }
    let mut role = conn.prepare_cached("INSERT INTO auth_roles (name) VALUES (?1)")?;
    let mut perm = conn.prepare_cached(
        "INSERT INTO auth_permissions (role, position, key, range_end, perm_type) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for (name, r) in &state.roles {
        role.execute([name])?;
        for (position, p) in r.permissions.iter().enumerate() {
            perm.execute(params![
                name,
                position as i64,
                p.key,
                p.range_end,
                p.perm_type
            ])?;
        }
    }
    let mut set =
        conn.prepare_cached("INSERT OR REPLACE INTO meta (name, value) VALUES (?1, ?2)")?;
    set.execute(params!["auth_enabled", i64::from(state.enabled)])?;
    set.execute(params!["auth_revision", state.revision as i64])?;
    Ok(())
}

/// Turn auth off in a state database no member serves yet: what
/// `tern-restore drill` does to its own scratch copy, so it can read back
/// every key without holding root's password. The users and roles stay.
pub fn switch_off(conn: &Connection) -> Result<(), rusqlite::Error> {
    let mut state = load(conn)?;
    state.enabled = false;
    save(conn, &state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb::{AuthRoleGrantPermissionRequest, AuthUserGrantRoleRequest};

    #[test]
    fn saved_state_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::mvcc::schema::open(&dir.path().join("state.db")).unwrap();
        assert_eq!(load(&conn).unwrap(), AuthState::default());
        let mut s = AuthState::default();
        s.user_add("root", "$2b$10$hash", false).unwrap();
        s.user_add("svc", "", true).unwrap();
        s.role_add("reader").unwrap();
        s.user_grant_role(&AuthUserGrantRoleRequest {
            user: "root".into(),
            role: "root".into(),
        })
        .unwrap();
        s.role_grant_permission(&AuthRoleGrantPermissionRequest {
            name: "reader".into(),
            perm: Some(Permission {
                perm_type: 0,
                key: b"/a/".to_vec(),
                range_end: b"/a0".to_vec(),
            }),
        })
        .unwrap();
        s.enable().unwrap();
        save(&conn, &s).unwrap();
        assert_eq!(load(&conn).unwrap(), s);
    }
}
