# OpenBao for the stack: integrated (raft) storage on its volume, unsealed at every start
# with the static key from the vault-unseal secret (production: a KMS or HSM seal, TLS on
# the listener, three or five nodes).
storage "raft" {
  path    = "/vault/data"
  node_id = "vault"
}
listener "tcp" {
  address     = "0.0.0.0:8200"
  tls_disable = true
}
seal "static" {
  current_key_id = "stack-1"
  current_key    = "file:///run/secrets/vault-unseal.key"
}
api_addr     = "http://vault:8200"
cluster_addr = "http://vault:8201"
