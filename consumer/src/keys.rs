//! `consumer keys create|revoke|list`: the API keys of the conversions endpoint, in the
//! compacted `referral_keys` topic (key: the key's public id; value: `shared::keys::KeyRecord`).
//!
//! A secret is printed once, by `create`, and written nowhere: the topic holds its SHA-256.
//! `list` shows ids, names, accounts and statuses, never a secret or its hash. Like the
//! other operator commands, each returns after the broker acknowledged its message, and a
//! refused command writes nothing and exits 2 with the reason.

use anyhow::{anyhow, bail};
use shared::keys::{KeyId, KeyRecord, KeyStatus};

use crate::config::{Config, KeysCommand};
use crate::registry::{current, current_accounts, publish_all};

pub async fn keys(config: &Config, cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Create { account, name } => {
            shared::keys::check_name(&name).map_err(|e| anyhow!("--name: {e}"))?;
            if !current_accounts(config).await?.contains_key(&account) {
                bail!("unknown account {account:?}: create it first with `consumer accounts set {account} --plan PLAN`");
            }
            let key = shared::keys::new_key(&account, &name).map_err(anyhow::Error::msg)?;
            publish_all(
                config,
                &config.keys_topic,
                vec![(key.id.as_str().to_owned(), Some(key.record.encode()))],
            )
            .await?;
            println!("key {} for account {account}", key.id.as_str());
            println!("secret (shown once, store it now): {}", key.secret);
        }
        KeysCommand::Revoke { key_id } => {
            let id = KeyId::parse(&key_id).map_err(|e| anyhow!("{key_id:?}: {e}"))?;
            let Some(record) = current(config, &config.keys_topic, KeyRecord::decode)
                .await?
                .remove(id.as_str())
            else {
                bail!("unknown key {}", id.as_str());
            };
            if record.status == KeyStatus::Revoked {
                println!("key {}: already revoked", id.as_str());
                return Ok(());
            }
            publish_all(
                config,
                &config.keys_topic,
                vec![(id.as_str().to_owned(), Some(record.revoked().encode()))],
            )
            .await?;
            println!("key {}: revoked (account {})", id.as_str(), record.account);
        }
        KeysCommand::List { account } => {
            let mut keys: Vec<(String, KeyRecord)> =
                current(config, &config.keys_topic, KeyRecord::decode)
                    .await?
                    .into_iter()
                    .filter(|(_, r)| account.as_ref().is_none_or(|a| *a == r.account))
                    .collect();
            keys.sort_by(|a, b| {
                (&a.1.account, a.1.created_at_ms).cmp(&(&b.1.account, b.1.created_at_ms))
            });
            println!("{:<20}  {:<24}  {:<8}  name", "key", "account", "status");
            for (id, r) in keys {
                let status = match r.status {
                    KeyStatus::Active => "active",
                    KeyStatus::Revoked => "revoked",
                };
                println!("{id:<20}  {:<24}  {status:<8}  {}", r.account, r.name);
            }
        }
    }
    Ok(())
}
