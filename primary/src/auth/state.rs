//! Users, roles and what each auth request does to them, following etcd
//! 3.4's `auth/store.go` step for step (same checks, same order, same
//! errors). Pure logic over an in-memory value: the applier clones the
//! state, applies one request, and on success saves and installs the copy.

use std::collections::BTreeMap;

use super::{AuthError, ROOT};
use crate::proto::authpb::Permission;
use crate::proto::etcdserverpb::{
    AuthRoleGrantPermissionRequest, AuthRoleRevokePermissionRequest, AuthUserGrantRoleRequest,
    AuthUserRevokeRoleRequest,
};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct User {
    /// bcrypt hash; empty for a user added with `--no-password`.
    pub password_hash: String,
    pub no_password: bool,
    /// Sorted, as etcd keeps them.
    pub roles: Vec<String>,
}

impl User {
    pub fn has_root_role(&self) -> bool {
        self.roles
            .binary_search_by(|r| r.as_str().cmp(ROOT))
            .is_ok()
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Role {
    /// Sorted by key, as etcd keeps them.
    pub permissions: Vec<Permission>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuthState {
    pub enabled: bool,
    /// etcd's auth revision: bumped by every change to users, roles or the
    /// enabled flag (but not by enabling, as in etcd).
    pub revision: u64,
    pub users: BTreeMap<String, User>,
    pub roles: BTreeMap<String, Role>,
}

impl AuthState {
    /// etcd's AuthEnable: needs a root user holding the root role; enabling
    /// twice is not an error.
    pub fn enable(&mut self) -> Result<(), AuthError> {
        if self.enabled {
            return Ok(());
        }
        let root = self.users.get(ROOT).ok_or(AuthError::RootUserNotExist)?;
        if !root.has_root_role() {
            return Err(AuthError::RootRoleNotExist);
        }
        self.enabled = true;
        Ok(())
    }

    pub fn disable(&mut self) {
        if self.enabled {
            self.enabled = false;
            self.revision += 1;
        }
    }

    /// Whether `name` may get a token (the password was checked already).
    pub fn can_authenticate(&self, name: &str) -> Result<(), AuthError> {
        if !self.enabled {
            return Err(AuthError::AuthNotEnabled);
        }
        match self.users.get(name) {
            Some(u) if !u.no_password => Ok(()),
            _ => Err(AuthError::AuthFailed),
        }
    }

    pub fn user_add(
        &mut self,
        name: &str,
        password_hash: &str,
        no_password: bool,
    ) -> Result<(), AuthError> {
        if name.is_empty() {
            return Err(AuthError::UserEmpty);
        }
        if self.users.contains_key(name) {
            return Err(AuthError::UserAlreadyExist);
        }
        self.users.insert(
            name.to_string(),
            User {
                password_hash: password_hash.to_string(),
                no_password,
                roles: Vec::new(),
            },
        );
        self.revision += 1;
        Ok(())
    }

    pub fn user_delete(&mut self, name: &str) -> Result<(), AuthError> {
        if self.enabled && name == ROOT {
            return Err(AuthError::InvalidAuthMgmt);
        }
        self.users.remove(name).ok_or(AuthError::UserNotFound)?;
        self.revision += 1;
        Ok(())
    }

    pub fn user_change_password(
        &mut self,
        name: &str,
        password_hash: &str,
    ) -> Result<(), AuthError> {
        let user = self.users.get_mut(name).ok_or(AuthError::UserNotFound)?;
        user.password_hash = password_hash.to_string();
        self.revision += 1;
        Ok(())
    }

    pub fn user_grant_role(&mut self, r: &AuthUserGrantRoleRequest) -> Result<(), AuthError> {
        if !self.users.contains_key(&r.user) {
            return Err(AuthError::UserNotFound);
        }
        // The root role exists implicitly; it needs no RoleAdd.
        if r.role != ROOT && !self.roles.contains_key(&r.role) {
            return Err(AuthError::RoleNotFound);
        }
        let user = self.users.get_mut(&r.user).ok_or(AuthError::UserNotFound)?;
        match user.roles.binary_search(&r.role) {
            // etcd ignores a grant of a role the user has.
            Ok(_) => return Ok(()),
            Err(at) => user.roles.insert(at, r.role.clone()),
        }
        self.revision += 1;
        Ok(())
    }

    pub fn user_revoke_role(&mut self, r: &AuthUserRevokeRoleRequest) -> Result<(), AuthError> {
        if self.enabled && r.name == ROOT && r.role == ROOT {
            return Err(AuthError::InvalidAuthMgmt);
        }
        let user = self.users.get_mut(&r.name).ok_or(AuthError::UserNotFound)?;
        let before = user.roles.len();
        user.roles.retain(|role| *role != r.role);
        if user.roles.len() == before {
            return Err(AuthError::RoleNotGranted);
        }
        self.revision += 1;
        Ok(())
    }

    pub fn role_add(&mut self, name: &str) -> Result<(), AuthError> {
        if name.is_empty() {
            return Err(AuthError::RoleEmpty);
        }
        if self.roles.contains_key(name) {
            return Err(AuthError::RoleAlreadyExist);
        }
        self.roles.insert(name.to_string(), Role::default());
        self.revision += 1;
        Ok(())
    }

    /// Deleting a role also takes it from every user that had it.
    pub fn role_delete(&mut self, name: &str) -> Result<(), AuthError> {
        if self.enabled && name == ROOT {
            return Err(AuthError::InvalidAuthMgmt);
        }
        self.roles.remove(name).ok_or(AuthError::RoleNotFound)?;
        for user in self.users.values_mut() {
            user.roles.retain(|r| r != name);
        }
        self.revision += 1;
        Ok(())
    }

    /// A permission on the same key and range end replaces the old one's
    /// type; a new one is inserted in key order.
    pub fn role_grant_permission(
        &mut self,
        r: &AuthRoleGrantPermissionRequest,
    ) -> Result<(), AuthError> {
        let perm = r.perm.as_ref().ok_or(AuthError::PermissionNotGiven)?;
        // An empty or inverted range grants nothing; the 3.4 releases since
        // 3.4.24 (and 3.5) refuse it, where 3.4.23 stored it.
        if !super::permissions::valid_range(&perm.key, &perm.range_end) {
            return Err(AuthError::InvalidAuthMgmt);
        }
        let role = self.roles.get_mut(&r.name).ok_or(AuthError::RoleNotFound)?;
        let perms = &mut role.permissions;
        let at = perms.partition_point(|p| p.key < perm.key);
        match perms.get_mut(at) {
            Some(p) if p.key == perm.key && p.range_end == perm.range_end => {
                p.perm_type = perm.perm_type;
            }
            _ => {
                let after = perms.partition_point(|p| p.key <= perm.key);
                perms.insert(after, perm.clone());
            }
        }
        self.revision += 1;
        Ok(())
    }

    pub fn role_revoke_permission(
        &mut self,
        r: &AuthRoleRevokePermissionRequest,
    ) -> Result<(), AuthError> {
        let role = self.roles.get_mut(&r.role).ok_or(AuthError::RoleNotFound)?;
        let before = role.permissions.len();
        role.permissions
            .retain(|p| p.key != r.key || p.range_end != r.range_end);
        if role.permissions.len() == before {
            return Err(AuthError::PermissionNotGranted);
        }
        self.revision += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::authpb::permission::Type;

    fn grant(user: &str, role: &str) -> AuthUserGrantRoleRequest {
        AuthUserGrantRoleRequest {
            user: user.into(),
            role: role.into(),
        }
    }

    #[test]
    fn enable_needs_root_with_root_role() {
        let mut s = AuthState::default();
        assert_eq!(s.enable(), Err(AuthError::RootUserNotExist));
        s.user_add("root", "h", false).unwrap();
        assert_eq!(s.enable(), Err(AuthError::RootRoleNotExist));
        // The root role needs no RoleAdd.
        s.user_grant_role(&grant("root", "root")).unwrap();
        let revision = s.revision;
        s.enable().unwrap();
        assert!(s.enabled);
        assert_eq!(s.revision, revision, "enabling does not bump, as in etcd");
        assert_eq!(s.user_delete("root"), Err(AuthError::InvalidAuthMgmt));
        s.disable();
        assert_eq!(s.revision, revision + 1);
    }

    #[test]
    fn roles_and_permissions_follow_etcd() {
        let mut s = AuthState::default();
        s.user_add("u", "", true).unwrap();
        assert_eq!(s.user_add("u", "", true), Err(AuthError::UserAlreadyExist));
        assert_eq!(s.user_add("", "", true), Err(AuthError::UserEmpty));
        assert_eq!(
            s.user_grant_role(&grant("u", "r")),
            Err(AuthError::RoleNotFound)
        );
        s.role_add("r").unwrap();
        s.user_grant_role(&grant("u", "r")).unwrap();
        let revision = s.revision;
        s.user_grant_role(&grant("u", "r")).unwrap();
        assert_eq!(s.revision, revision, "a repeated grant is ignored");
        let perm = |key: &str, end: &str, t: Type| AuthRoleGrantPermissionRequest {
            name: "r".into(),
            perm: Some(Permission {
                perm_type: t as i32,
                key: key.into(),
                range_end: end.into(),
            }),
        };
        s.role_grant_permission(&perm("b", "", Type::Read)).unwrap();
        s.role_grant_permission(&perm("a", "b", Type::Read))
            .unwrap();
        s.role_grant_permission(&perm("a", "b", Type::Write))
            .unwrap();
        let perms = &s.roles["r"].permissions;
        assert_eq!(perms.len(), 2);
        assert_eq!(perms[0].key, b"a");
        assert_eq!(perms[0].perm_type, Type::Write as i32);
        assert_eq!(
            s.role_grant_permission(&perm("b", "a", Type::Read)),
            Err(AuthError::InvalidAuthMgmt)
        );
        let revoke = AuthRoleRevokePermissionRequest {
            role: "r".into(),
            key: b"a".to_vec(),
            range_end: b"c".to_vec(),
        };
        assert_eq!(
            s.role_revoke_permission(&revoke),
            Err(AuthError::PermissionNotGranted)
        );
        s.role_delete("r").unwrap();
        assert!(s.users["u"].roles.is_empty());
        let revoke_role = AuthUserRevokeRoleRequest {
            name: "u".into(),
            role: "r".into(),
        };
        assert_eq!(
            s.user_revoke_role(&revoke_role),
            Err(AuthError::RoleNotGranted)
        );
    }
}
