# The keys Nix must trust for what nix-sidecar serves: the global `trusted-public-keys`, each
# upstream's own list, and a preset's keys when the upstream names a preset and lists none of
# its own (as nix-sidecar itself does). Presets come from presets.json, which the daemon reads
# too. A pure function of the settings, so a test can evaluate it without nixpkgs.
settings:
let
  presets = builtins.fromJSON (builtins.readFile ./presets.json);
  ofUpstream = up:
    if up ? trusted-public-keys then up.trusted-public-keys
    else if up ? preset then presets.${up.preset}.keys or [ ]
    else [ ];
  all = (settings.trusted-public-keys or [ ])
    ++ builtins.concatMap ofUpstream (settings.upstream or [ ]);
in
builtins.foldl' (kept: key: if builtins.elem key kept then kept else kept ++ [ key ]) [ ] all
