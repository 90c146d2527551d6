# One cluster's fedmesh: the manifests come from `fedmesh install
# --terraform` (the Terraform `external` protocol), so this module and the
# CLI apply the same objects; each one becomes a kubernetes_manifest.

locals {
  bundle_pem = coalesce(var.ca.bundle_pem, var.ca.cert_pem)
}

data "external" "install" {
  program = [var.fedmesh_cli, "install", "--terraform"]

  query = {
    cluster               = var.cluster_name
    trust_domain          = var.trust_domain
    store_endpoints       = jsonencode(var.store_endpoints)
    store_ca_pem          = try(var.store_tls.ca_pem, "")
    store_cert_pem        = try(coalesce(var.store_tls.cert_pem, ""), "")
    store_key_pem         = try(coalesce(var.store_tls.key_pem, ""), "")
    store_server_name     = try(coalesce(var.store_tls.server_name, ""), "")
    ca_cert_pem           = var.ca.cert_pem
    ca_key_pem            = var.ca.key_pem
    ca_chain_pem          = var.ca.chain_pem
    bundle_pem            = local.bundle_pem
    image                 = var.image
    pull_policy           = var.image_pull_policy
    gateway_service_type  = var.gateway.service_type
    gateway_annotations   = jsonencode(var.gateway.annotations)
    gateway_advertise     = var.gateway.advertise_address == null ? "" : var.gateway.advertise_address
    gateway_advertise_tcp = var.gateway.advertise_tcp_address == null ? "" : var.gateway.advertise_tcp_address
    gateway_node_ports    = var.gateway.node_ports == null ? "" : "${var.gateway.node_ports.quic},${var.gateway.node_ports.tcp}"
    gateway_replicas      = tostring(var.gateway.replicas)
    controller_replicas   = tostring(var.controller_replicas)
    peers                 = jsonencode(var.peers)
    clusterset_cidrs      = jsonencode(var.clusterset_cidrs)
    coredns_configmap     = var.coredns_configmap
    drill_operators       = jsonencode(var.drill_operators)
  }
}

locals {
  documents = [
    for d in split("\n---\n", "\n${data.external.install.result.manifests}") :
    yamldecode(d) if trimspace(d) != "" && trimspace(d) != "---"
  ]
  # Keyed by kind/namespace/name: stable addresses across re-renders.
  objects = {
    for o in local.documents :
    "${o.kind}/${try(o.metadata.namespace, "_")}/${o.metadata.name}" => o
  }
  # CRDs and the namespace first; everything else after them.
  first = { for k, o in local.objects : k => o if contains(["CustomResourceDefinition", "Namespace"], o.kind) }
  rest  = { for k, o in local.objects : k => o if !contains(["CustomResourceDefinition", "Namespace"], o.kind) }
}

resource "kubernetes_manifest" "first" {
  for_each = local.first
  manifest = each.value
}

resource "kubernetes_manifest" "this" {
  for_each = local.rest
  manifest = each.value

  depends_on = [kubernetes_manifest.first]
}
