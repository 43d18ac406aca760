# services.nix-sidecar-exchange: the token exchange for self-hosted caches (workload identity
# in, short-lived Attic tokens out), as the hardened unit in systemd/ runs it.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.nix-sidecar-exchange;
  settingsFormat = pkgs.formats.toml { };
  credentials = "/run/credentials/nix-sidecar-exchange.service";
  # The key files are handed to the unit as credentials; the config names the copies.
  settings = cfg.settings // {
    signing-key-file = "${credentials}/signing-key";
  } // lib.optionalAttrs (cfg.tlsKeyFile != null) {
    tls-key = "${credentials}/tls-key";
  };
  configFile = settingsFormat.generate "nix-sidecar-exchange.toml" settings;
in
{
  options.services.nix-sidecar-exchange = {
    enable = lib.mkEnableOption "the nix-sidecar token exchange (workload identity to view-scoped cache tokens)";

    package = lib.mkOption {
      type = lib.types.package;
      description = "The nix-sidecar package.";
    };

    signingKeyFile = lib.mkOption {
      type = lib.types.path;
      example = "/run/secrets/attic-hs256";
      description = "atticd's token-hs256-secret-base64 (or an RSA private key in PEM), readable by root only; passed to the unit as a credential.";
    };

    tlsKeyFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      description = "The TLS private key (with settings.tls-cert); passed as a credential. Without it, listen on loopback behind a TLS proxy.";
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Open the listen port in the firewall.";
    };

    settings = lib.mkOption {
      type = settingsFormat.type;
      default = { };
      example = lib.literalExpression ''
        {
          listen = "0.0.0.0:8443";
          tls-cert = "/etc/ssl/exchange.pem";
          minted-audience = "attic";
          issuer = [ { url = "https://token.actions.githubusercontent.com"; audience = "https://attic.example.org"; } ];
          rule = [ {
            issuer = "https://token.actions.githubusercontent.com";
            claims = { repository = "example-org/*"; ref = "refs/heads/main"; };
            grant = { "org-*" = [ "pull" ]; "org-ci" = [ "pull" "push" ]; };
          } ];
        }
      '';
      description = "The exchange's configuration (README, \"Self-hosting without static secrets\"); rendered to TOML. `signing-key-file` and `tls-key` are set from the options above.";
    };
  };

  config = lib.mkIf cfg.enable {
    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [
      (lib.toInt (lib.last (lib.splitString ":" (cfg.settings.listen or "127.0.0.1:8080"))))
    ];

    systemd.services.nix-sidecar-exchange = {
      description = "nix-sidecar exchange: workload identities in, short-lived view-scoped cache tokens out";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      serviceConfig = import ./hardening.nix // {
        ExecStart = "${lib.getExe cfg.package} exchange --config ${configFile}";
        Restart = "on-failure";
        RestartSec = "2s";
        TimeoutStopSec = "20s";
        LoadCredential = [ "signing-key:${cfg.signingKeyFile}" ]
          ++ lib.optional (cfg.tlsKeyFile != null) "tls-key:${cfg.tlsKeyFile}";
        LogsDirectory = "nix-sidecar-exchange";
        LogsDirectoryMode = "0700";

        PrivateUsers = true;
      };
    };
  };
}
