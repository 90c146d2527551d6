# fedmesh on the three kind clusters of kind-configs/ (east, west, north),
# each joined to the other two. Create the clusters and load the image
# first (e2e/kind/up.sh does both; this replaces its install step), and
# the CAs with `fedmesh ca init --trust-domain <c>.fedmesh.test --out
# <ca_dir>/<c>`.

terraform {
  required_version = ">= 1.5"
  required_providers {
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = ">= 2.30"
    }
  }
}

provider "kubernetes" {
  alias          = "east"
  config_path    = var.kubeconfig
  config_context = "kind-fedmesh-east"
}

provider "kubernetes" {
  alias          = "west"
  config_path    = var.kubeconfig
  config_context = "kind-fedmesh-west"
}

provider "kubernetes" {
  alias          = "north"
  config_path    = var.kubeconfig
  config_context = "kind-fedmesh-north"
}

locals {
  ca = {
    for c in ["east", "west", "north"] : c => {
      cert_pem   = file("${var.ca_dir}/${c}/ca.pem")
      key_pem    = file("${var.ca_dir}/${c}/ca.key")
      chain_pem  = file("${var.ca_dir}/${c}/chain.pem")
      bundle_pem = file("${var.ca_dir}/${c}/bundle.pem")
    }
  }
  # kind: one node per cluster, the gateway's NodePorts on its IP.
  gateway = {
    for c in ["east", "west", "north"] : c => {
      advertise_address = "${var.node_ips[c]}:30443"
      service_type      = "NodePort"
      node_ports        = { quic = 30443, tcp = 30444 }
      replicas          = 1
    }
  }
}

module "east" {
  source    = "../../modules/fedmesh-cluster"
  providers = { kubernetes = kubernetes.east }

  cluster_name      = "east"
  trust_domain      = "east.fedmesh.test"
  store_endpoints   = [var.store_endpoint]
  ca                = local.ca.east
  image             = var.image
  image_pull_policy = "Never"
  gateway           = local.gateway.east
  peers             = { west = local.ca.west.bundle_pem, north = local.ca.north.bundle_pem }
  fedmesh_cli       = var.fedmesh_cli
}

module "west" {
  source    = "../../modules/fedmesh-cluster"
  providers = { kubernetes = kubernetes.west }

  cluster_name      = "west"
  trust_domain      = "west.fedmesh.test"
  store_endpoints   = [var.store_endpoint]
  ca                = local.ca.west
  image             = var.image
  image_pull_policy = "Never"
  gateway           = local.gateway.west
  peers             = { east = local.ca.east.bundle_pem, north = local.ca.north.bundle_pem }
  fedmesh_cli       = var.fedmesh_cli
}

module "north" {
  source    = "../../modules/fedmesh-cluster"
  providers = { kubernetes = kubernetes.north }

  cluster_name      = "north"
  trust_domain      = "north.fedmesh.test"
  store_endpoints   = [var.store_endpoint]
  ca                = local.ca.north
  image             = var.image
  image_pull_policy = "Never"
  gateway           = local.gateway.north
  peers             = { east = local.ca.east.bundle_pem, west = local.ca.west.bundle_pem }
  fedmesh_cli       = var.fedmesh_cli
}
