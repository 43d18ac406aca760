# The sandbox both units run in (systemd/*.service spell out the same); each unit adds what
# it needs: the sidecar AF_UNIX (nix-daemon's socket, for push), the exchange PrivateUsers.
{
  DynamicUser = true;
  UMask = "0077";
  NoNewPrivileges = true;
  CapabilityBoundingSet = "";
  AmbientCapabilities = "";
  ProtectSystem = "strict";
  ProtectHome = true;
  PrivateTmp = true;
  PrivateDevices = true;
  ProtectHostname = true;
  ProtectClock = true;
  ProtectKernelTunables = true;
  ProtectKernelModules = true;
  ProtectKernelLogs = true;
  ProtectControlGroups = true;
  ProtectProc = "invisible";
  ProcSubset = "pid";
  RestrictAddressFamilies = [ "AF_INET" "AF_INET6" ];
  RestrictNamespaces = true;
  RestrictRealtime = true;
  RestrictSUIDSGID = true;
  LockPersonality = true;
  MemoryDenyWriteExecute = true;
  RemoveIPC = true;
  SystemCallArchitectures = "native";
  SystemCallFilter = [ "@system-service" "~@privileged @resources" ];
  SystemCallErrorNumber = "EPERM";
  DevicePolicy = "closed";
  KeyringMode = "private";
}
