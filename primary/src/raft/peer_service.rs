//! The receiving side of the peer transport: the `ternpb.Peer` service on
//! the peer URLs.

use std::sync::Arc;

use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};

use super::snapshot::Snapshots;
use crate::member::Member;
use crate::metrics::from_peer;
use crate::mvcc::write::members;
use crate::proto::ternpb::{
    peer_server::Peer, MembersRequest, MembersResponse, PeerAck, PeerMember, RaftBatch,
    SnapshotChunk,
};

pub struct PeerService {
    member: Arc<Member>,
    snapshots: Arc<Snapshots>,
}

impl PeerService {
    pub fn new(member: Arc<Member>, snapshots: Arc<Snapshots>) -> Self {
        PeerService { member, snapshots }
    }
}

fn decode(bytes: &[u8]) -> Result<Message, Status> {
    Message::parse_from_bytes(bytes)
        .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn send(
        &self,
        request: Request<Streaming<RaftBatch>>,
    ) -> Result<Response<PeerAck>, Status> {
        let mut stream = request.into_inner();
        while let Some(batch) = stream.message().await? {
            let bytes: usize = batch.messages.iter().map(|b| b.len()).sum();
            let messages = batch
                .messages
                .iter()
                .map(|b| decode(b))
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(first) = messages.first() {
                self.member
                    .metrics
                    .peer_received_bytes
                    .get_or_create(&from_peer(first.from))
                    .inc_by(bytes as u64);
            }
            if self.member.node.step(messages).is_err() {
                return Err(Status::unavailable("member stopped"));
            }
        }
        Ok(Response::new(PeerAck {}))
    }

    /// Stage the file, then hand the message to Raft pointing at it.
    async fn snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<PeerAck>, Status> {
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        let mut message = decode(&first.message)?;
        if message.get_msg_type() != MessageType::MsgSnapshot {
            return Err(Status::invalid_argument("first chunk is not a snapshot"));
        }
        let index = message.get_snapshot().get_metadata().index;
        let path = self.snapshots.receive_path(index);
        let io = |e: std::io::Error| Status::internal(format!("staging snapshot: {e}"));
        let received = async {
            let mut file = tokio::fs::File::create(&path).await.map_err(io)?;
            file.write_all(&first.data).await.map_err(io)?;
            let mut bytes = first.data.len();
            while let Some(chunk) = stream.message().await? {
                file.write_all(&chunk.data).await.map_err(io)?;
                bytes += chunk.data.len();
            }
            file.sync_all().await.map_err(io)?;
            Ok::<usize, Status>(bytes)
        }
        .await;
        let bytes = match received {
            Ok(b) => b,
            Err(e) => {
                let _ = tokio::fs::remove_file(&path).await;
                return Err(e);
            }
        };
        self.member
            .metrics
            .peer_received_bytes
            .get_or_create(&from_peer(message.from))
            .inc_by(bytes as u64);
        tracing::info!(
            from = format!("{:x}", message.from),
            index,
            bytes,
            "snapshot received"
        );
        message.mut_snapshot().data = path.to_string_lossy().as_bytes().to_vec().into();
        if self.member.node.step(vec![message]).is_err() {
            return Err(Status::unavailable("member stopped"));
        }
        Ok(Response::new(PeerAck {}))
    }

    async fn members(
        &self,
        _: Request<MembersRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        let rows = self
            .member
            .read(|conn, _| members(conn).map_err(crate::error::mvcc_status))
            .await?;
        Ok(Response::new(MembersResponse {
            cluster_id: self.member.cluster_id,
            leader: self.member.node.status.leader(),
            members: rows
                .into_iter()
                .map(
                    |(id, name, peer_urls, client_urls, is_learner)| PeerMember {
                        id,
                        name,
                        peer_urls,
                        client_urls,
                        is_learner,
                    },
                )
                .collect(),
        }))
    }
}
