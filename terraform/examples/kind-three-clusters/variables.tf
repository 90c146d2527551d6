variable "kubeconfig" {
  description = "The kubeconfig holding the kind-fedmesh-{east,west,north} contexts."
  type        = string
  default     = "~/.kube/config"
}

variable "ca_dir" {
  description = "Directory with one `fedmesh ca init` output per cluster (east/, west/, north/)."
  type        = string
  default     = "../../../target/kind/ca"
}

variable "store_endpoint" {
  description = "The federation store: etcd on the kind Docker network (`http://<fedmesh-etcd IP>:2379`)."
  type        = string
}

variable "node_ips" {
  description = "Each cluster's node IP on the kind network (`docker inspect -f '{{.NetworkSettings.Networks.kind.IPAddress}}' fedmesh-<c>-control-plane`)."
  type        = map(string)

  validation {
    condition     = alltrue([for c in ["east", "west", "north"] : contains(keys(var.node_ips), c)])
    error_message = "node_ips: needs east, west and north."
  }
}

variable "image" {
  description = "The fedmesh image loaded into the clusters (`kind load docker-image`)."
  type        = string
  default     = "fedmesh:dev"
}

variable "fedmesh_cli" {
  description = "The fedmesh binary that renders the manifests."
  type        = string
  default     = "../../../target/release/fedmesh"
}
