# Every rule here is also enforced by `fedmesh install`; the validations
# refuse bad input at plan time, before anything is applied, with the rule
# that failed. crates/deploy/tests/terraform.rs holds the two together.

variable "cluster_name" {
  description = "This cluster's name in the federation (an RFC 1123 label: it becomes a DNS label and a label value)."
  type        = string

  validation {
    condition     = can(regex("^.{1,63}$", var.cluster_name))
    error_message = "cluster_name: must be 1 to 63 characters."
  }
  validation {
    condition     = can(regex("^[a-z0-9-]*$", var.cluster_name))
    error_message = "cluster_name: may contain only lowercase letters, digits and '-'."
  }
  validation {
    condition     = can(regex("^[a-z0-9](.*[a-z0-9])?$", var.cluster_name))
    error_message = "cluster_name: must start and end with a lowercase letter or digit."
  }
}

variable "trust_domain" {
  description = "This cluster's SPIFFE trust domain, e.g. `east.acme`. Must match the CA's."
  type        = string

  validation {
    condition     = can(regex("^.{1,253}$", var.trust_domain))
    error_message = "trust_domain: must be 1 to 253 characters."
  }
  validation {
    condition     = can(regex("^[a-z0-9._-]*$", var.trust_domain))
    error_message = "trust_domain: may contain only lowercase letters, digits, '-', '_' and '.'."
  }
  validation {
    condition     = can(regex("^[^.]+(\\.[^.]+)*$", var.trust_domain))
    error_message = "trust_domain: must not have empty labels ('..', leading or trailing '.')."
  }
  validation {
    condition     = can(regex("^[a-z0-9](.*[a-z0-9])?$", var.trust_domain))
    error_message = "trust_domain: must start and end with a lowercase letter or digit."
  }
}

variable "store_endpoints" {
  description = "etcd client URLs of the federation store (`https://etcd-0.acme.net:2379`)."
  type        = list(string)

  validation {
    condition     = length(var.store_endpoints) >= 1 && length(var.store_endpoints) <= 16
    error_message = "store_endpoints: 1 to 16 endpoints."
  }
  validation {
    condition     = alltrue([for e in var.store_endpoints : can(regex("^https?://[^/\\s:]+:[0-9]{1,5}$", e))])
    error_message = "store_endpoints: each must be http://host:port or https://host:port."
  }
}

variable "store_tls" {
  description = "TLS to etcd: the CA (PEM) that signs etcd's certificates, and optionally a client certificate and key. Endpoints must then be https://."
  type = object({
    ca_pem      = string
    cert_pem    = optional(string)
    key_pem     = optional(string)
    server_name = optional(string)
  })
  default   = null
  sensitive = true

  validation {
    condition     = var.store_tls == null || ((try(var.store_tls.cert_pem, null) == null) == (try(var.store_tls.key_pem, null) == null))
    error_message = "store_tls: cert_pem and key_pem go together."
  }
}

variable "ca" {
  description = "The cluster CA as `fedmesh ca init` writes it (ca.pem, ca.key, optionally chain.pem and bundle.pem). Its trust domain must be trust_domain."
  type = object({
    cert_pem   = string
    key_pem    = string
    chain_pem  = optional(string, "")
    bundle_pem = optional(string)
  })
  sensitive = true

  validation {
    condition     = can(regex("-----BEGIN CERTIFICATE-----", var.ca.cert_pem)) && can(regex("PRIVATE KEY-----", var.ca.key_pem))
    error_message = "ca: cert_pem must be a PEM certificate and key_pem a PEM private key."
  }
}

variable "image" {
  description = "The fedmesh image (controller, gateway, sidecar and init container)."
  type        = string
  default     = "ghcr.io/fedmesh/fedmesh:0.1.0"

  validation {
    condition     = can(regex("^[a-z0-9._/:-]+(:[A-Za-z0-9._-]+)?(@sha256:[a-f0-9]+)?$", var.image)) && length(var.image) <= 255
    error_message = "image: lowercase repository names, then an optional :tag or @digest (at most 255 characters)."
  }
}

variable "image_pull_policy" {
  description = "IfNotPresent, Always or Never (kind: Never, with the image loaded)."
  type        = string
  default     = "IfNotPresent"

  validation {
    condition     = contains(["IfNotPresent", "Always", "Never"], var.image_pull_policy)
    error_message = "image_pull_policy: must be one of IfNotPresent, Always, Never."
  }
}

variable "gateway" {
  description = <<-EOT
    The east-west gateway: `advertise_address` is the QUIC address (IP:port)
    peers reach it at (a reserved load balancer IP, or a node IP with
    the node port); left out with a LoadBalancer, the controller advertises
    the address the load balancer gets; `service_type` LoadBalancer,
    NodePort or ClusterIP;
    `annotations` on its Service (cloud load balancer settings);
    `node_ports` for NodePort; `replicas` 1 to 5.
  EOT
  type = object({
    advertise_address     = optional(string)
    advertise_tcp_address = optional(string)
    service_type          = optional(string, "LoadBalancer")
    annotations           = optional(map(string), {})
    node_ports = optional(object({
      quic = number
      tcp  = number
    }))
    replicas = optional(number, 2)
  })

  validation {
    condition     = contains(["LoadBalancer", "NodePort", "ClusterIP"], var.gateway.service_type)
    error_message = "gateway.service_type: must be one of LoadBalancer, NodePort, ClusterIP."
  }
  validation {
    condition     = var.gateway.advertise_address == null || can(regex("^([0-9.]+|\\[[0-9a-fA-F:.]+\\]):[0-9]{1,5}$", var.gateway.advertise_address))
    error_message = "gateway.advertise_address: must be IP:PORT (IPv6 as [addr]:port)."
  }
  validation {
    condition     = var.gateway.advertise_address != null || var.gateway.service_type == "LoadBalancer"
    error_message = "gateway.advertise_address: required unless service_type is LoadBalancer (whose address is then discovered)."
  }
  validation {
    condition     = var.gateway.node_ports == null || (var.gateway.service_type == "NodePort" && try(var.gateway.node_ports.quic >= 30000 && var.gateway.node_ports.quic <= 32767 && var.gateway.node_ports.tcp >= 30000 && var.gateway.node_ports.tcp <= 32767, false))
    error_message = "gateway.node_ports: only with service_type NodePort, each a port number from 30000 to 32767."
  }
  validation {
    condition     = var.gateway.replicas >= 1 && var.gateway.replicas <= 5 && floor(var.gateway.replicas) == var.gateway.replicas
    error_message = "gateway.replicas: must be from 1 to 5."
  }
  validation {
    condition     = alltrue([for k in keys(var.gateway.annotations) : can(regex("^(([a-z0-9]([-a-z0-9]*[a-z0-9])?)(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$", k))])
    error_message = "gateway.annotations: each key is an optional DNS-subdomain prefix and '/', then 1 to 63 letters, digits, '-', '_' or '.', alphanumeric at both ends."
  }
}

variable "controller_replicas" {
  description = "Controller replicas: one leader (elected through a Lease), the rest standing by."
  type        = number
  default     = 2

  validation {
    condition     = var.controller_replicas >= 1 && var.controller_replicas <= 5 && floor(var.controller_replicas) == var.controller_replicas
    error_message = "controller_replicas: must be from 1 to 5."
  }
}

variable "peers" {
  description = "Clusters to join: name => that cluster's root bundle (PEM), obtained out of band (another module's `bundle_pem` output)."
  type        = map(string)
  default     = {}

  validation {
    condition     = alltrue([for k in keys(var.peers) : can(regex("^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", k))])
    error_message = "peers: each key is a cluster name (1 to 63 lowercase letters, digits and '-', alphanumeric at both ends)."
  }
  validation {
    condition     = alltrue([for v in values(var.peers) : can(regex("-----BEGIN CERTIFICATE-----", v))])
    error_message = "peers: each value is a PEM bundle."
  }
}

variable "clusterset_cidrs" {
  description = "Allocate ClusterSet IPs from these CIDRs (one per IP family) and serve `clusterset.local` from the controller (Service `fedmesh-dns`). Empty: neither."
  type        = list(string)
  default     = []

  validation {
    condition     = length(var.clusterset_cidrs) <= 2 && alltrue([for c in var.clusterset_cidrs : can(cidrhost(c, 0))])
    error_message = "clusterset_cidrs: at most two CIDRs (one per IP family)."
  }
}

variable "coredns_configmap" {
  description = "With `clusterset_cidrs`: CoreDNS's ConfigMap (NAMESPACE/NAME), which the controller keeps forwarding `clusterset.local` to `fedmesh-dns`; `none` leaves CoreDNS alone."
  type        = string
  default     = "kube-system/coredns"

  validation {
    condition     = var.coredns_configmap == "none" || can(regex("^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", var.coredns_configmap))
    error_message = "coredns_configmap: NAMESPACE/NAME, or none."
  }
}

variable "drill_operators" {
  description = "SPIFFE principals (spiffe://TD/ns/NS/SA, spiffe://TD/ns/NS/*, spiffe://TD/*) allowed to set faults through the gateways' drill API (mTLS, port 15022, headless Service fedmesh-gateway-drills). Empty: no drill API."
  type        = list(string)
  default     = []

  validation {
    condition     = length(var.drill_operators) <= 64 && alltrue([for o in var.drill_operators : can(regex("^spiffe://[a-z0-9._-]+/[A-Za-z0-9._*/-]+$", o))])
    error_message = "drill_operators: at most 64, each spiffe://TD/PATH (a namespace or trust domain ends in /*)."
  }
}

variable "fedmesh_cli" {
  description = "The `fedmesh` binary that renders the manifests (the same version as the image): the module applies exactly what `fedmesh install` prints."
  type        = string
  default     = "fedmesh"
}
