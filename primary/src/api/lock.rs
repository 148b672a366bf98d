//! The Lock service (`v3lockpb.Lock`), as etcd's `v3lock` runs it: a lock
//! named N is held by the oldest key under `N/`, one per lease
//! (`N/<lease in hex>`); Lock waits for every older key to go, Unlock
//! deletes the caller's key. A holder whose lease expires loses the lock.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::concurrency::{
    create_revision_is, first_created_op, get_op, put_op, range_of, LocalClient,
};
use crate::member::Member;
use crate::proto::etcdserverpb::TxnRequest;
use crate::proto::v3lockpb::{
    lock_server::Lock, LockRequest, LockResponse, UnlockRequest, UnlockResponse,
};

pub struct LockService {
    member: Arc<Member>,
}

impl LockService {
    pub fn new(member: Arc<Member>) -> Self {
        LockService { member }
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(&self, request: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let client = LocalClient::acting_for(self.member.clone(), &request);
        let r = request.into_inner();
        let lease = client.session_lease(r.lease).await?;
        let mut prefix = r.name;
        prefix.push(b'/');
        let my_key = [prefix.as_slice(), format!("{lease:x}").as_bytes()].concat();
        // Join the waiters (or find this lease already among them) and
        // read the current holder, in one txn.
        let txn = client
            .txn(TxnRequest {
                compare: vec![create_revision_is(&my_key, 0)],
                success: vec![put_op(&my_key, b"", lease), first_created_op(&prefix)],
                failure: vec![get_op(&my_key), first_created_op(&prefix)],
            })
            .await?;
        let header = txn.header.unwrap_or_default();
        let my_revision = if txn.succeeded {
            header.revision
        } else {
            range_of(&txn, 0)
                .kvs
                .first()
                .map_or(header.revision, |kv| kv.create_revision)
        };
        let owner = range_of(&txn, 1);
        if owner
            .kvs
            .first()
            .is_none_or(|kv| kv.create_revision == my_revision)
        {
            return Ok(Response::new(LockResponse {
                header: Some(header),
                key: my_key,
            }));
        }
        // Wait for every older waiter; if the caller goes away or the wait
        // fails, leave the queue (etcd's Mutex.Lock unlocks then).
        let mut leave = LeaveOnDrop(Some((client.clone(), my_key.clone())));
        let header = client.wait_deletes(&prefix, my_revision - 1).await?;
        leave.0 = None;
        Ok(Response::new(LockResponse {
            header: Some(header),
            key: my_key,
        }))
    }

    async fn unlock(
        &self,
        request: Request<UnlockRequest>,
    ) -> Result<Response<UnlockResponse>, Status> {
        let client = LocalClient::acting_for(self.member.clone(), &request);
        let deleted = client.delete(request.into_inner().key).await?;
        Ok(Response::new(UnlockResponse {
            header: deleted.header,
        }))
    }
}

/// Deletes a waiter's key unless disarmed: a Lock whose caller gave up.
struct LeaveOnDrop(Option<(LocalClient, Vec<u8>)>);

impl Drop for LeaveOnDrop {
    fn drop(&mut self) {
        if let Some((client, key)) = self.0.take() {
            tokio::spawn(async move {
                if let Err(e) = client.delete(key).await {
                    tracing::warn!(error = %e.message(), "could not leave a lock's queue");
                }
            });
        }
    }
}
