//! The Election service (`v3electionpb.Election`), as etcd's `v3election`
//! runs it: candidates for election N put `N/<lease in hex>` on their
//! lease; the oldest key is the leader and its value the proclaimed one.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};

use super::concurrency::{create_revision_is, delete_op, get_op, put_op, range_of, LocalClient};
use crate::member::Member;
use crate::mvcc::KeyRange;
use crate::proto::etcdserverpb::{ResponseHeader, TxnRequest};
use crate::proto::mvccpb::event::EventType;
use crate::proto::v3electionpb::{
    election_server::Election, CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest,
    LeaderResponse, ProclaimRequest, ProclaimResponse, ResignRequest, ResignResponse,
};

/// etcd's concurrency errors, which its services return as they are
/// (gRPC code Unknown).
const NOT_LEADER: &str = "election: not leader";
const NO_LEADER: &str = "election: no leader";
const MISSING_LEADER_KEY: &str = "\"leader\" field must be provided";

pub struct ElectionService {
    member: Arc<Member>,
}

impl ElectionService {
    pub fn new(member: Arc<Member>) -> Self {
        ElectionService { member }
    }
}

fn prefix_of(name: &[u8]) -> Vec<u8> {
    [name, b"/"].concat()
}

/// `Election.Proclaim`: put `value` on the leader key if it is still the
/// one created at `rev`; the txn's header.
async fn proclaim(
    client: &LocalClient,
    leader: &LeaderKey,
    value: &[u8],
) -> Result<ResponseHeader, Status> {
    let txn = client
        .txn(TxnRequest {
            compare: vec![create_revision_is(&leader.key, leader.rev)],
            success: vec![put_op(&leader.key, value, leader.lease)],
            failure: vec![],
        })
        .await?;
    if !txn.succeeded {
        return Err(Status::unknown(NOT_LEADER));
    }
    Ok(txn.header.unwrap_or_default())
}

/// `Election.Resign`: delete the leader key if it is still the one created
/// at `rev`; not being the leader is no error.
async fn resign(client: &LocalClient, leader: &LeaderKey) -> Result<ResponseHeader, Status> {
    let txn = client
        .txn(TxnRequest {
            compare: vec![create_revision_is(&leader.key, leader.rev)],
            success: vec![delete_op(&leader.key)],
            failure: vec![],
        })
        .await?;
    Ok(txn.header.unwrap_or_default())
}

type ObserveStream = Pin<Box<dyn Stream<Item = Result<LeaderResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Election for ElectionService {
    async fn campaign(
        &self,
        request: Request<CampaignRequest>,
    ) -> Result<Response<CampaignResponse>, Status> {
        let client = LocalClient::acting_for(self.member.clone(), &request);
        let r = request.into_inner();
        let lease = client.session_lease(r.lease).await?;
        let prefix = prefix_of(&r.name);
        let key = [prefix.as_slice(), format!("{lease:x}").as_bytes()].concat();
        let txn = client
            .txn(TxnRequest {
                compare: vec![create_revision_is(&key, 0)],
                success: vec![put_op(&key, &r.value, lease)],
                failure: vec![get_op(&key)],
            })
            .await?;
        let header = txn.header.unwrap_or_default();
        let mut leader = LeaderKey {
            name: r.name.clone(),
            key: key.clone(),
            rev: header.revision,
            lease,
        };
        if !txn.succeeded {
            if let Some(kv) = range_of(&txn, 0).kvs.first() {
                leader.rev = kv.create_revision;
                if kv.value != r.value {
                    if let Err(e) = proclaim(&client, &leader, &r.value).await {
                        let _ = resign(&client, &leader).await;
                        return Err(e);
                    }
                }
            }
        }
        // Wait for every older candidate. A caller that goes away resigns
        // (etcd resigns on a cancelled campaign).
        let mut resign_on_drop = ResignOnDrop(Some((client.clone(), leader.clone())));
        let waited = client.wait_deletes(&prefix, leader.rev - 1).await;
        if waited.is_err() {
            // A failed wait (not a cancelled one) keeps the key, as etcd.
            resign_on_drop.0 = None;
        }
        waited?;
        resign_on_drop.0 = None;
        Ok(Response::new(CampaignResponse {
            header: Some(header),
            leader: Some(leader),
        }))
    }

    async fn proclaim(
        &self,
        request: Request<ProclaimRequest>,
    ) -> Result<Response<ProclaimResponse>, Status> {
        let client = LocalClient::acting_for(self.member.clone(), &request);
        let r = request.into_inner();
        let leader = r
            .leader
            .ok_or_else(|| Status::unknown(MISSING_LEADER_KEY))?;
        let header = proclaim(&client, &leader, &r.value).await?;
        Ok(Response::new(ProclaimResponse {
            header: Some(header),
        }))
    }

    async fn leader(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<LeaderResponse>, Status> {
        let client = LocalClient::acting_for(self.member.clone(), &request);
        let prefix = prefix_of(&request.into_inner().name);
        let mut first = client.by_create(&prefix, true, 0).await?;
        if first.kvs.is_empty() {
            return Err(Status::unknown(NO_LEADER));
        }
        Ok(Response::new(LeaderResponse {
            header: first.header,
            kv: Some(first.kvs.swap_remove(0)),
        }))
    }

    type ObserveStream = ObserveStream;

    /// etcd's `Election.observe`: the leader now (or, with none, the first
    /// key put), then every new value of its key, then the next leader
    /// once it is deleted.
    async fn observe(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        let client = LocalClient::acting_for(self.member.clone(), &request);
        let prefix = prefix_of(&request.into_inner().name);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            if let Err(e) = observe(&client, &prefix, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn resign(
        &self,
        request: Request<ResignRequest>,
    ) -> Result<Response<ResignResponse>, Status> {
        let client = LocalClient::acting_for(self.member.clone(), &request);
        let leader = request
            .into_inner()
            .leader
            .ok_or_else(|| Status::unknown(MISSING_LEADER_KEY))?;
        let header = resign(&client, &leader).await?;
        Ok(Response::new(ResignResponse {
            header: Some(header),
        }))
    }
}

/// Feeds `tx` until the observer goes away (the send fails).
async fn observe(
    client: &LocalClient,
    prefix: &[u8],
    tx: &tokio::sync::mpsc::Sender<Result<LeaderResponse, Status>>,
) -> Result<(), Status> {
    let header_at = |revision: i64| Some(client.member().header(revision));
    loop {
        let first = client.by_create(prefix, true, 0).await?;
        let revision = first.header.as_ref().map_or(0, |h| h.revision);
        let (mut revision, kv) = match first.kvs.into_iter().next() {
            Some(kv) => (revision, kv),
            None => {
                // No leader: the first key put under the prefix is.
                let end = crate::mvcc::read::prefix_end(prefix);
                let mut watch = client.watch(KeyRange::new(prefix, &end), revision)?;
                loop {
                    let (_, events) = watch.next().await?;
                    let put = events
                        .into_iter()
                        .find(|e| e.r#type == EventType::Put as i32)
                        .and_then(|e| e.kv);
                    if let Some(kv) = put {
                        break (kv.mod_revision, kv);
                    }
                }
            }
        };
        let leader_key = kv.key.clone();
        let sent = LeaderResponse {
            header: header_at(revision),
            kv: Some(kv),
        };
        if tx.send(Ok(sent)).await.is_err() {
            return Ok(());
        }
        // The leader's new values, until its key goes.
        let mut watch = client.watch(KeyRange::Single(leader_key), revision + 1)?;
        'leader: loop {
            let (at, events) = watch.next().await?;
            revision = at;
            for event in events {
                if event.r#type == EventType::Delete as i32 {
                    break 'leader;
                }
                let update = LeaderResponse {
                    header: header_at(revision),
                    kv: event.kv,
                };
                if tx.send(Ok(update)).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// Resigns a campaign whose caller gave up before it won.
struct ResignOnDrop(Option<(LocalClient, LeaderKey)>);

impl Drop for ResignOnDrop {
    fn drop(&mut self) {
        if let Some((client, leader)) = self.0.take() {
            tokio::spawn(async move {
                if let Err(e) = resign(&client, &leader).await {
                    tracing::warn!(error = %e.message(), "could not resign a cancelled campaign");
                }
            });
        }
    }
}
