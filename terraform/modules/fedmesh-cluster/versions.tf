terraform {
  required_version = ">= 1.5"

  required_providers {
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = ">= 2.30"
    }
    external = {
      source  = "hashicorp/external"
      version = ">= 2.3"
    }
  }
}
