//! One identity world: an OIDC issuer, the cloud doubles minting for one subject, and an
//! upstream whose view for that subject is the fixture's closure.

use super::cloud::Cloud;
use super::issuer::Issuer;
use super::nix::{fixture, in_store, Client};
use super::sidecar::Sidecar;
use super::upstream::UpstreamDouble;

pub const AUD: &str = "https://cache.test";

pub struct World {
    pub issuer: Issuer,
    pub cloud: Cloud,
    pub upstream: UpstreamDouble,
    pub dir: tempfile::TempDir,
}

/// An upstream whose view for `sub` is the fixture's closure (not `outside`), and the cloud
/// doubles minting tokens for `sub`.
pub async fn world(sub: &str) -> World {
    let fx = fixture();
    let issuer = Issuer::start().await;
    let cloud = Cloud::start(&issuer, sub, AUD).await;
    let upstream = UpstreamDouble::start(fx.cache.clone(), Some((&issuer.url, AUD))).await;
    upstream.grant(sub, &fx.closure);
    World {
        issuer,
        cloud,
        upstream,
        dir: tempfile::tempdir().unwrap(),
    }
}

impl World {
    pub fn sidecar(&self, identity_table: &str, extra_env: &[(&str, &str)]) -> Sidecar {
        self.sidecar_with("", identity_table, extra_env)
    }

    pub fn sidecar_with(
        &self,
        top_level: &str,
        identity_table: &str,
        extra_env: &[(&str, &str)],
    ) -> Sidecar {
        let config = format!(
            "{top_level}\ntrusted-public-keys = [\"{}\"]\n[[upstream]]\nname = \"org\"\nurl = \"{}\"\nidentity = \"id\"\n\n[identity.id]\n{identity_table}",
            fixture().public_key,
            self.upstream.url
        );
        let mut env = self.cloud.env();
        env.extend(
            extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Sidecar::start(self.dir.path(), &config, &env)
    }
}

/// Real Nix substitutes the closure; the outside path is a miss.
pub async fn nix_pulls_the_view(sidecar: &Sidecar, client: &str) {
    nix_pulls_into(sidecar, sidecar.dir.join(client)).await;
    let outside = sidecar.narinfo(&fixture().outside).await;
    assert_eq!(outside.status, 404, "outside the view");
}

/// Real Nix (2.8) substitutes the fixture's closure through `sidecar` into a store under `dir`.
pub async fn nix_pulls_into(sidecar: &Sidecar, dir: std::path::PathBuf) {
    nix_pulls_with(Client::Nix28, sidecar, dir).await
}

/// [`nix_pulls_into`] with `client`.
pub async fn nix_pulls_with(client: Client, sidecar: &Sidecar, dir: std::path::PathBuf) {
    let fx = fixture();
    let (url, pk, top) = (sidecar.url.clone(), fx.public_key.clone(), fx.top.clone());
    let d = dir.clone();
    let out = tokio::task::spawn_blocking(move || client.substitute(&url, &pk, &[&top], &d))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        sidecar.logs()
    );
    assert!(fx.closure.iter().all(|p| in_store(&dir, p)));
}
