# Vault for the compose stack: file storage on a volume, plain HTTP on the stack's network
# only (put TLS in front before exposing it anywhere).
storage "file" {
  path = "/vault/data"
}
listener "tcp" {
  address     = "0.0.0.0:8200"
  tls_disable = true
}
disable_mlock = false
ui            = false
