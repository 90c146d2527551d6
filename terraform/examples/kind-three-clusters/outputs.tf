output "gateway_addresses" {
  description = "Each cluster's advertised gateway (QUIC) address."
  value = {
    east  = module.east.gateway_address
    west  = module.west.gateway_address
    north = module.north.gateway_address
  }
}

output "bundle_fingerprints" {
  description = "Each cluster's trust bundle fingerprint (compare with `fedmesh status --store`)."
  value = {
    east  = module.east.bundle_fingerprint
    west  = module.west.bundle_fingerprint
    north = module.north.bundle_fingerprint
  }
}
