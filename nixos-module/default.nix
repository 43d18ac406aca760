# services.nix-sidecar: run nix-sidecar next to nix-daemon and point Nix at it.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.nix-sidecar;
  settingsFormat = pkgs.formats.toml { };
  listen = cfg.settings.listen or [ "127.0.0.1:37515" ];
  port = lib.last (lib.splitString ":" (builtins.head listen));
  portOf = address: lib.toInt (lib.last (lib.splitString ":" address));
  # The site's TLS key is handed to the unit as a credential; the config names the copy.
  settings = cfg.settings // lib.optionalAttrs (cfg.site.tlsKeyFile != null) {
    site = (cfg.settings.site or { }) // {
      tls-key = "/run/credentials/nix-sidecar.service/site-tls-key";
    };
  };
  configFile = settingsFormat.generate "nix-sidecar.toml" settings;
in
{
  imports = [ ./exchange.nix ];

  options.services.nix-sidecar = {
    enable = lib.mkEnableOption "nix-sidecar, a loopback binary cache with workload-identity upstream access";

    package = lib.mkOption {
      type = lib.types.package;
      description = "The nix-sidecar package.";
    };

    settings = lib.mkOption {
      type = settingsFormat.type;
      default = { };
      example = lib.literalExpression ''
        {
          upstream = [
            { name = "org"; url = "https://cache.example.org/org-view"; identity = "ci";
              trusted-public-keys = [ "<your-cache-key-name>:<base64 public key>" ]; }
            { preset = "nixos"; }  # cache.nixos.org with its key
          ];
          identity.ci = { provider = "gcp"; audience = "https://cache.example.org"; };
        }
      '';
      description = "nix-sidecar configuration (see docs/configuration.md); rendered to TOML. `cache-dir` is set by the unit.";
    };

    environmentFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      description = "An EnvironmentFile for the unit (e.g. the variable of a `static` identity).";
    };

    postBuildHook = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Set nix.settings.post-build-hook to queue every local build's outputs with `nix-sidecar push` (for builders whose upstreams have `push` set). The hook only enqueues; it never fails a build.";
    };

    site = {
      tlsKeyFile = lib.mkOption {
        type = lib.types.nullOr lib.types.path;
        default = null;
        description = "The private key of the site listener's certificate (settings.site.tls-cert), readable by root only; passed to the unit as a credential. The site listener (settings.site, README \"A site cache for a fleet\") needs TLS unless it listens on loopback.";
      };
      openFirewall = lib.mkOption {
        type = lib.types.bool;
        default = false;
        description = "Open the ports of settings.site.listen to the other machines of the site (allow-from still applies).";
      };
    };

    addSubstituter = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "Add http://127.0.0.1:<port> to nix.settings.substituters, and every key the upstreams need (global, per upstream, and presets' keys) to trusted-public-keys.";
    };
  };

  config = lib.mkIf cfg.enable {
    networking.firewall.allowedTCPPorts = lib.mkIf cfg.site.openFirewall
      (map portOf (cfg.settings.site.listen or [ ]));

    # Only nix-daemon (root) reads through the sidecar unless the settings say otherwise:
    # without it every local user reads what this machine's identity can.
    services.nix-sidecar.settings.allowed-uids = lib.mkDefault [ 0 ];

    nix.settings = lib.mkMerge [
      (lib.mkIf cfg.addSubstituter {
        substituters = lib.mkBefore [ "http://127.0.0.1:${port}" ];
        # Every key the upstreams' narinfos may be signed with: Nix checks them again.
        trusted-public-keys = import ./keys.nix cfg.settings;
      })
      # Only enqueues (the build waits for the hook), and never fails a build.
      (lib.mkIf cfg.postBuildHook {
        post-build-hook = pkgs.writeShellScript "nix-sidecar-post-build-hook" ''
          ${lib.getExe cfg.package} push --url http://127.0.0.1:${port} || echo "nix-sidecar push failed; $OUT_PATHS not queued" >&2
        '';
      })
    ];

    systemd.services.nix-sidecar = {
      # `nix path-info` and `nix-store --dump`, for `nix-sidecar push`.
      path = [ config.nix.package ];
      description = "nix-sidecar: loopback Nix binary cache with workload-identity upstream access";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      before = [ "nix-daemon.service" ];
      serviceConfig = import ./hardening.nix // {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${lib.getExe cfg.package} serve --config ${configFile} --cache-dir \${CACHE_DIRECTORY}";
        Restart = "on-failure";
        RestartSec = "2s";
        WatchdogSec = "30s";
        TimeoutStopSec = "20s";
        EnvironmentFile = lib.mkIf (cfg.environmentFile != null) cfg.environmentFile;
        LoadCredential = lib.mkIf (cfg.site.tlsKeyFile != null) [ "site-tls-key:${cfg.site.tlsKeyFile}" ];

        CacheDirectory = "nix-sidecar";
        CacheDirectoryMode = "0700";
        # No PrivateUsers: it would show every peer as uid 65534 and defeat allowed-uids.
        # AF_NETLINK: who owns a connection is asked of the kernel (NETLINK_SOCK_DIAG).
        RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" "AF_NETLINK" ];
      };
    };
  };
}
