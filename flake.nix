{
  description = "nix-sidecar: a loopback Nix binary cache that pulls from access-controlled upstreams with this machine's workload identity";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      package = pkgs: pkgs.rustPlatform.buildRustPackage {
        pname = "nix-sidecar";
        version = (builtins.fromTOML (builtins.readFile ./Cargo.toml)).package.version;
        src = nixpkgs.lib.cleanSource ./.;
        cargoLock.lockFile = ./Cargo.lock;
        # The integration tests need a writable /nix/store and loopback networking.
        doCheck = false;
        meta = {
          description = "Loopback Nix binary cache with workload-identity upstream access";
          mainProgram = "nix-sidecar";
          license = with nixpkgs.lib.licenses; [ mit asl20 ];
        };
      };
    in
    {
      packages = forAll (pkgs: { default = package pkgs; nix-sidecar = package pkgs; });

      overlays.default = final: _prev: { nix-sidecar = package final; };

      nixosModules.default = { pkgs, lib, ... }: {
        imports = [ ./nixos-module ];
        services.nix-sidecar.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        services.nix-sidecar-exchange.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
      };

      # A VM boots with the module, an anonymous upstream serving a binary cache, and
      # substitutes a path through the sidecar. Needs Nix with KVM; it cannot run in this CI.
      checks = forAll (pkgs: {
        vm = pkgs.testers.runNixOSTest {
          name = "nix-sidecar";
          nodes.machine = { pkgs, ... }: {
            imports = [ self.nixosModules.default ];
            services.nix-sidecar = {
              enable = true;
              settings = {
                upstream = [{ name = "local"; url = "http://127.0.0.1:8080"; }];
                require-signatures = false;
              };
            };
            nix.settings.require-sigs = false;
            environment.systemPackages = [ pkgs.python3 ];
          };
          testScript = ''
            machine.wait_for_unit("nix-sidecar.service")
            machine.succeed("nix-store --generate-binary-cache-key k /tmp/sk /tmp/pk")
            path = machine.succeed("nix-build --no-out-link -E 'derivation { name = \"x\"; system = builtins.currentSystem; builder = \"/bin/sh\"; args = [\"-c\" \"echo hi > $out\"]; }'").strip()
            machine.succeed(f"nix copy --to file:///tmp/bc {path}")
            machine.succeed("cd /tmp/bc && (python3 -m http.server 8080 >/dev/null 2>&1 &)")
            machine.wait_for_open_port(8080)
            machine.succeed(f"nix copy --store /tmp/dst --from http://127.0.0.1:37515 --option require-sigs false {path}")
            machine.succeed("curl -sf http://127.0.0.1:37515/_sidecar/health")
          '';
        };
      });
    };
}
