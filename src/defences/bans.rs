//! Temporary bans: networks refused on the guarded routes for a while, set
//! through the admin API on top of the configured `[client_ip] deny`.
//!
//! Bans are live state, not configuration: they sit beside the pure policy,
//! survive reloads, and disappear by themselves when they expire.
//!
//! Every decision reads this replica's own copy (a table behind a read
//! lock, indexed by network, so a lookup costs one hash probe per prefix
//! length in use, however many bans there are), never Redis. With the Redis store the bans live in one hash
//! under the store's hash tag (`{mgk}:bans`, field: the network, value: the
//! expiry on Redis' clock and the reason), and every replica replaces its
//! copy with Redis' list once a second ([`Bans::follow_store`]). A ban or
//! lift is therefore enforced at once by the replica that took it and
//! within about a second by the others, while a registration decision pays
//! nothing for it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use redis::Script;
use tokio::time::Instant;

use crate::client_ip::{masked, IpNet};
use crate::store::{SharedStore, StoreError};

/// The bans hash in Redis, on Redis' clock (microseconds).
///
/// KEYS: the hash. ARGV: mode (`add`, `remove` or `list`), then for `add`
/// the network, the duration and the reason, for `remove` the network.
///
/// Every mode answers how many bans it removed (`remove` only, else 0),
/// then the bans in force after its change as a flat list `network,
/// remaining, reason, …`, so the caller's copy is exact at once. Expired
/// entries are dropped on the way; the hash expires with its longest ban.
const BANS_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local mode = ARGV[1]
if mode == 'add' then
  local expires = now + tonumber(ARGV[3])
  redis.call('HSET', KEYS[1], ARGV[2], string.format('%.0f', expires) .. ' ' .. ARGV[4])
end
local removed = 0
if mode == 'remove' then removed = redis.call('HDEL', KEYS[1], ARGV[2]) end
local entries = redis.call('HGETALL', KEYS[1])
local out = {tostring(removed)}
local longest = 0
for i = 1, #entries, 2 do
  local value = entries[i + 1]
  local space = string.find(value, ' ', 1, true) or (#value + 1)
  local expires = tonumber(string.sub(value, 1, space - 1)) or 0
  if expires <= now then
    redis.call('HDEL', KEYS[1], entries[i])
  else
    if expires - now > longest then longest = expires - now end
    out[#out + 1] = entries[i]
    out[#out + 1] = string.format('%.0f', expires - now)
    out[#out + 1] = string.sub(value, space + 1)
  end
end
if longest > 0 then redis.call('PEXPIRE', KEYS[1], math.ceil(longest / 1000)) end
return out
";

/// Longest reason kept, in bytes.
pub const REASON_MAX: usize = 500;

/// One temporary ban.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ban {
    /// The banned network.
    pub network: IpNet,
    /// When it ends, on this replica's clock.
    pub until: Instant,
    /// Why, as the operator wrote it.
    pub reason: String,
}

impl Ban {
    /// Time left.
    pub fn remaining(&self) -> Duration {
        self.until.saturating_duration_since(Instant::now())
    }
}

/// Why a ban could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum BanError {
    /// Redis did not take the change; nothing changed.
    #[error("the shared ban list could not be updated: {0}")]
    Store(#[from] StoreError),
}

/// The ban table of this replica, shared across reloads; see the
/// [module documentation](self).
#[derive(Clone)]
pub struct Bans {
    shared: Arc<Shared>,
    redis: Option<SharedStore>,
}

struct Shared {
    bans: RwLock<Table>,
    script: Script,
}

/// The bans and their index.
#[derive(Default)]
struct Table {
    bans: Vec<Ban>,
    /// [`IpNet::key`] → position in `bans`.
    index: HashMap<(bool, u8, u128), usize>,
    /// The prefix lengths in use, IPv4 and IPv6, longest first.
    lengths: [Vec<u8>; 2],
}

impl Table {
    fn new(bans: Vec<Ban>) -> Self {
        let mut table = Table {
            bans,
            ..Table::default()
        };
        table.reindex();
        table
    }

    /// Changes the bans through `change` and rebuilds the index.
    fn change<T>(&mut self, change: impl FnOnce(&mut Vec<Ban>) -> T) -> T {
        let out = change(&mut self.bans);
        self.reindex();
        out
    }

    fn reindex(&mut self) {
        self.index.clear();
        self.lengths = Default::default();
        for (position, ban) in self.bans.iter().enumerate() {
            let key = ban.network.key();
            self.index.insert(key, position);
            let lengths = &mut self.lengths[usize::from(!key.0)];
            if !lengths.contains(&key.1) {
                lengths.push(key.1);
            }
        }
        for lengths in &mut self.lengths {
            lengths.sort_unstable_by(|a, b| b.cmp(a));
        }
    }

    /// The ban in force at `now` covering `ip`, the narrowest first.
    fn find(&self, ip: IpAddr, now: Instant) -> Option<&Ban> {
        let v4 = ip.to_canonical().is_ipv4();
        self.lengths[usize::from(!v4)].iter().find_map(|&len| {
            let (_, bits) = masked(ip, len);
            let ban = &self.bans[*self.index.get(&(v4, len, bits))?];
            (ban.until > now).then_some(ban)
        })
    }
}

impl std::fmt::Debug for Bans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bans")
            .field("count", &self.shared.read().bans.len())
            .field("redis", &self.redis.is_some())
            .finish()
    }
}

impl Default for Bans {
    fn default() -> Self {
        Bans {
            shared: Arc::new(Shared {
                bans: RwLock::new(Table::default()),
                script: Script::new(BANS_SCRIPT),
            }),
            redis: None,
        }
    }
}

impl Bans {
    /// The same table, kept in `redis` when the limiter has a Redis store.
    pub fn with_store(&self, redis: Option<SharedStore>) -> Self {
        Bans {
            shared: self.shared.clone(),
            redis,
        }
    }

    /// The ban in force covering `ip`, if any (this replica's copy).
    pub fn find(&self, ip: IpAddr) -> Option<Ban> {
        self.shared.read().find(ip, Instant::now()).cloned()
    }

    /// The bans in force, longest-lasting last.
    pub fn list(&self) -> Vec<Ban> {
        let now = Instant::now();
        let mut table = self.shared.write();
        if table.bans.iter().any(|ban| ban.until <= now) {
            table.change(|bans| bans.retain(|ban| ban.until > now));
        }
        let mut out = table.bans.clone();
        out.sort_by_key(|ban| ban.until);
        out
    }

    /// Bans `network` for `duration` (replacing a ban of the same network);
    /// the network is kept with its host bits cleared.
    pub async fn add(
        &self,
        network: IpNet,
        duration: Duration,
        reason: &str,
    ) -> Result<(), BanError> {
        let network = network.canonical();
        let reason: String = reason.chars().filter(|c| !c.is_control()).collect();
        let reason = truncate(&reason, REASON_MAX);
        if let Some(redis) = &self.redis {
            let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
            let args = [
                "add".to_owned(),
                network.to_string(),
                micros.to_string(),
                reason.to_owned(),
            ];
            self.run(redis, &args).await?;
            return Ok(());
        }
        let ban = Ban {
            network,
            until: Instant::now() + duration,
            reason: reason.to_owned(),
        };
        self.shared.write().change(|bans| {
            bans.retain(|old| old.network != network);
            bans.push(ban);
        });
        Ok(())
    }

    /// Lifts the ban of `network`; `false` when there was none.
    pub async fn remove(&self, network: IpNet) -> Result<bool, BanError> {
        let network = network.canonical();
        if let Some(redis) = &self.redis {
            let args = ["remove".to_owned(), network.to_string()];
            // Redis says whether it held the ban: this replica's copy may
            // be up to a second behind.
            return Ok(self.run(redis, &args).await? > 0);
        }
        Ok(self.shared.write().change(|bans| {
            let before = bans.len();
            bans.retain(|ban| ban.network != network);
            bans.len() != before
        }))
    }

    /// Replaces this replica's copy with Redis' list; called every second
    /// by each replica using Redis. When Redis does not answer the copy
    /// stays (its bans still expire locally).
    pub async fn follow_store(&self) {
        let Some(redis) = &self.redis else { return };
        if let Err(error) = self.run(redis, &["list".to_owned()]).await {
            tracing::debug!(%error, "ban list could not be read from redis");
        }
    }

    /// Runs the script and takes its answer as the new copy; returns how
    /// many bans it removed.
    async fn run(&self, redis: &SharedStore, args: &[String]) -> Result<u64, StoreError> {
        let keys = [redis.tagged_key("bans")];
        let answer: Vec<String> = redis.run_script(&self.shared.script, &keys, args).await?;
        let Some((removed, entries)) = answer.split_first() else {
            return Err(StoreError::BadAnswer);
        };
        let removed = removed.parse().map_err(|_| StoreError::BadAnswer)?;
        let now = Instant::now();
        let bans = entries
            .chunks(3)
            .filter_map(|entry| {
                let [network, remaining, reason] = entry else {
                    return None;
                };
                Some(Ban {
                    network: network.parse().ok()?,
                    until: now + Duration::from_micros(remaining.parse().ok()?),
                    reason: reason.clone(),
                })
            })
            .collect();
        *self.shared.write() = Table::new(bans);
        Ok(removed)
    }
}

impl Shared {
    fn read(&self) -> RwLockReadGuard<'_, Table> {
        // Plain data; a panic elsewhere leaves it usable.
        self.bans.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Table> {
        self.bans.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// `text` cut to at most `max` bytes on a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bans_cover_their_network_and_expire_by_themselves() {
        let bans = Bans::default();
        let net: IpNet = "203.0.113.0/24".parse().unwrap();
        bans.add(net, Duration::from_secs(60), "spam wave")
            .await
            .unwrap();
        let inside: IpAddr = "203.0.113.9".parse().unwrap();
        let outside: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(bans.find(inside).unwrap().reason, "spam wave");
        assert!(bans.find(outside).is_none());
        assert_eq!(bans.list().len(), 1);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(bans.find(inside).is_none());
        assert!(bans.list().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_ban_is_replaced_and_lifted_and_survives_a_new_store() {
        let bans = Bans::default();
        let net: IpNet = "2001:db8::/32".parse().unwrap();
        bans.add(net, Duration::from_secs(10), "a").await.unwrap();
        bans.add(net, Duration::from_secs(20), "b").await.unwrap();
        let reloaded = bans.with_store(None);
        assert_eq!(reloaded.list().len(), 1);
        assert_eq!(reloaded.list()[0].reason, "b");
        assert!(reloaded.remove(net).await.unwrap());
        assert!(!bans.remove(net).await.unwrap());
        assert!(bans.find("2001:db8::1".parse().unwrap()).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_index_finds_every_covering_ban_in_force() {
        let bans = Bans::default();
        for i in 0..1000u32 {
            let net: IpNet = format!("10.{}.{}.0/24", i / 256, i % 256).parse().unwrap();
            bans.add(net, Duration::from_secs(3600), "many")
                .await
                .unwrap();
        }
        let wide: IpNet = "172.16.9.9/12".parse().unwrap();
        let narrow: IpNet = "172.16.0.0/24".parse().unwrap();
        bans.add(wide, Duration::from_secs(60), "wide")
            .await
            .unwrap();
        bans.add(narrow, Duration::from_secs(10), "narrow")
            .await
            .unwrap();
        let v6: IpNet = "2001:db8:1::/48".parse().unwrap();
        bans.add(v6, Duration::from_secs(60), "v6").await.unwrap();

        let find = |ip: &str| bans.find(ip.parse().unwrap()).map(|ban| ban.reason);
        assert_eq!(find("10.3.231.7").as_deref(), Some("many"));
        assert_eq!(find("10.3.232.7"), None);
        assert_eq!(find("172.16.0.1").as_deref(), Some("narrow"));
        assert_eq!(find("::ffff:172.31.255.255").as_deref(), Some("wide"));
        assert_eq!(find("172.32.0.1"), None);
        assert_eq!(find("2001:db8:1:ffff::1").as_deref(), Some("v6"));
        assert_eq!(find("2001:db8:2::1"), None);
        // Once the narrow ban ends, the wide one still covers its network.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(find("172.16.0.1").as_deref(), Some("wide"));
        // A ban is kept, replaced and lifted under its network's canonical
        // spelling.
        let listed = bans.list();
        let wide = listed.iter().find(|ban| ban.reason == "wide").unwrap();
        assert_eq!(wide.network.to_string(), "172.16.0.0/12");
        assert!(bans.remove("172.16.0.0/12".parse().unwrap()).await.unwrap());
        assert_eq!(find("172.16.0.1"), None);
    }

    #[test]
    fn reasons_are_cut_on_a_character_boundary() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 5), "abc");
    }
}
