//! Paths from the local Nix store: their closures and infos, from `nix path-info --json
//! --recursive` (the NAR bytes come later, from `nix-store --dump`).

use super::error::PathInfoError;
use super::info::{parse_path_info_json, PathInfo};

/// The closures of `paths`, references before referrers where Nix lists them so (the queue
/// enforces the order anyway).
pub async fn closure(paths: &[String]) -> Result<Vec<PathInfo>, PathInfoError> {
    let output = tokio::process::Command::new("nix")
        .args([
            "--extra-experimental-features",
            "nix-command",
            "path-info",
            "--json",
            "--recursive",
        ])
        .args(paths)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(PathInfoError::Run)?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(PathInfoError::Failed(stderr.trim().to_string()));
    }
    parse_path_info_json(&output.stdout)
}
