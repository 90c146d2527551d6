output "gateway_address" {
  description = "The QUIC address peers reach this cluster's gateways at: advertise_address, or the load balancer's IP and the QUIC port once it has one (what the controller then advertises)."
  value = var.gateway.advertise_address != null ? var.gateway.advertise_address : try(
    "${kubernetes_manifest.this["Service/fedmesh-system/fedmesh-gateway"].object.status.loadBalancer.ingress[0].ip}:15443",
    null,
  )
}

output "gateway_load_balancer" {
  description = "The gateway Service's load balancer address (IP or hostname) once the cloud assigned one; null for NodePort and ClusterIP."
  value = try(
    kubernetes_manifest.this["Service/fedmesh-system/fedmesh-gateway"].object.status.loadBalancer.ingress[0].ip,
    kubernetes_manifest.this["Service/fedmesh-system/fedmesh-gateway"].object.status.loadBalancer.ingress[0].hostname,
    null,
  )
}

output "bundle_fingerprint" {
  description = "`sha256:` fingerprint of this cluster's trust bundle, as `fedmesh status` and `/config_dump` show it: compare it with what peers pinned."
  value       = data.external.install.result.bundle_fingerprint
}

output "bundle_pem" {
  description = "This cluster's root bundle (PEM, public): pass it to the other clusters' `peers`."
  value       = local.bundle_pem
}
