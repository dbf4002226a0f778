//! `oauth-client add|list|remove`: the clients `/v1/refresh-notify` uses.

use super::device::open_device;
use super::setup::{load_for_run, open_store, read_secret_file, refuse_root};
use super::OauthAction;
use crate::config::Profile;
use anyhow::{anyhow, bail, Result};
use std::path::Path;

pub fn run(config: &Path, action: OauthAction) -> Result<()> {
    use crate::broker::oauth;
    let cfg = load_for_run(config)?;
    refuse_root(&cfg)?;
    let store = open_store(&cfg)?;
    match action {
        OauthAction::Add {
            name,
            client_id,
            client_secret_file,
            token_url,
            auth,
            services,
        } => {
            let auth = match auth.as_str() {
                "post" => oauth::ClientAuth::Post,
                "basic" => oauth::ClientAuth::Basic,
                _ => bail!("--auth must be post or basic"),
            };
            let secret = read_secret_file(&client_secret_file)?;
            let backend = crate::custody::keyring::keyring(open_device(&cfg)?.backend(), &store);
            let c = oauth::OAuthClient::new(
                &backend,
                &name,
                &client_id,
                &secret,
                &token_url,
                auth,
                cfg.profile == Profile::Dev,
            )
            .and_then(|c| c.with_services(services))
            .map_err(|e| anyhow!(e))?;
            if let Some((other, service)) = oauth::overlap(&store, &c) {
                bail!("service {service:?} is already refreshed by OAuth client {other}: remove it there first (a service has one client)");
            }
            oauth::save(&store, &c).map_err(|e| anyhow!(e))?;
            println!(
                "added OAuth client {} (client id {}, token URL {}, auth {:?}, refreshes {})",
                c.name,
                c.client_id,
                c.token_url,
                c.auth,
                c.services_label()
            );
        }
        OauthAction::List => {
            for c in oauth::all(&store) {
                println!(
                    "{}\t{}\t{}\t{:?}\t{}",
                    c.name,
                    c.client_id,
                    c.token_url,
                    c.auth,
                    c.services_label()
                );
            }
        }
        OauthAction::Remove { name } => {
            if !store.oauth_delete_blocking(oauth::key(&name))? {
                bail!("no OAuth client named {name}");
            }
            println!("removed OAuth client {}", oauth::key(&name));
        }
    }
    Ok(())
}
