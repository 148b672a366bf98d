//! Requests only the leader can answer, sent on by a follower or learner:
//! lease keep-alives and time-to-live (the leader holds the lease clocks)
//! and learner promotion (the leader knows how far each member is), as
//! etcd forwards them. The leader is reached on its advertised client URLs
//! with the etcd API itself; the channel is kept while the leader stays.

use std::sync::Mutex;
use std::time::Duration;

use tonic::transport::Channel;
use tonic::Status;

use crate::error::EtcdError;
use crate::mvcc::write::MemberRow;
use crate::tls::DialTls;

pub struct LeaderLink {
    cached: Mutex<Option<(u64, Channel)>>,
    /// How an `https://` client URL of the leader is dialed.
    tls: DialTls,
}

impl LeaderLink {
    pub fn new(tls: DialTls) -> Self {
        LeaderLink {
            cached: Mutex::new(None),
            tls,
        }
    }

    /// A channel to `leader`, whose row in the member list is `row`.
    pub async fn channel(&self, leader: u64, row: Option<MemberRow>) -> Result<Channel, Status> {
        if let Some((id, ch)) = self
            .cached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            if *id == leader {
                return Ok(ch.clone());
            }
        }
        let urls = row.map(|r| r.3).unwrap_or_default();
        match self.dial(&urls).await {
            Ok(ch) => {
                *self.cached.lock().unwrap_or_else(|e| e.into_inner()) = Some((leader, ch.clone()));
                Ok(ch)
            }
            Err(e) => {
                tracing::debug!(leader = format!("{leader:x}"), error = %e, "leader unreachable");
                Err(EtcdError::NoLeader.into())
            }
        }
    }

    /// A new channel to the first of `urls` (a member's client URLs) that
    /// answers.
    pub async fn dial(&self, urls: &[String]) -> Result<Channel, String> {
        let mut last = "no client URL".to_string();
        for url in urls {
            let endpoint = match self.tls.endpoint(url).await {
                Ok(endpoint) => endpoint,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            match endpoint
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .connect()
                .await
            {
                Ok(ch) => return Ok(ch),
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }

    /// Drop the channel after a failure, so the next call reconnects.
    pub fn forget(&self) {
        *self.cached.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}
