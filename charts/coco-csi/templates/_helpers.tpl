{{/*
Names. The name part is kept to 63 characters (it is a label value); the full name to 45, so
that it plus the longest suffix used on a DNS-label-limited object ("-node-metrics", a
Service) stays within 63.
*/}}
{{- define "coco-csi.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "coco-csi.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 45 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "coco-csi.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Common labels; selectorLabels are the immutable subset used by selectors. */}}
{{- define "coco-csi.labels" -}}
helm.sh/chart: {{ include "coco-csi.chart" . }}
{{ include "coco-csi.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: coco-csi
{{- end -}}

{{- define "coco-csi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "coco-csi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "coco-csi.nodeSelectorLabels" -}}
{{ include "coco-csi.selectorLabels" . }}
app.kubernetes.io/component: node
{{- end -}}

{{- define "coco-csi.controllerSelectorLabels" -}}
{{ include "coco-csi.selectorLabels" . }}
app.kubernetes.io/component: controller
{{- end -}}

{{- define "coco-csi.nodeServiceAccountName" -}}
{{- default (printf "%s-node" (include "coco-csi.fullname" .)) .Values.node.serviceAccount.name -}}
{{- end -}}

{{- define "coco-csi.controllerServiceAccountName" -}}
{{- default (printf "%s-controller" (include "coco-csi.fullname" .)) .Values.controller.serviceAccount.name -}}
{{- end -}}

{{- define "coco-csi.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
Socket layout. The plugin listens on /csi/csi.sock inside the pod; on the host that file is
<kubeletRootDir>/plugins/<socketDirName>/csi.sock, which is what the registrar tells kubelet.
Both sides come from these helpers so they cannot drift apart.
*/}}
{{- define "coco-csi.kubeletRootDir" -}}
{{- .Values.kubeletRootDir | trimSuffix "/" -}}
{{- end -}}

{{- define "coco-csi.pluginDir" -}}
{{- printf "%s/plugins/%s" (include "coco-csi.kubeletRootDir" .) .Values.node.socketDirName -}}
{{- end -}}

{{- define "coco-csi.socketMountDir" -}}/csi{{- end -}}
{{- define "coco-csi.socketPath" -}}{{ include "coco-csi.socketMountDir" . }}/csi.sock{{- end -}}
{{- define "coco-csi.endpoint" -}}unix://{{ include "coco-csi.socketPath" . }}{{- end -}}

{{/*
Directory of a unix:// socket URL, for mounting it from the (guest) host.
*/}}
{{- define "coco-csi.socketUrlDir" -}}
{{- $path := trimPrefix "unix://" (trimPrefix "grpc+" (trimPrefix "ttrpc+" .)) -}}
{{- dir $path -}}
{{- end -}}

{{/*
Path inside the node container of the KBS CA certificate (when a ConfigMap is given).
*/}}
{{- define "coco-csi.kbsCaPath" -}}
/etc/coco-csi/kbs-ca/{{ .Values.resolver.kbs.caConfigMap.key }}
{{- end -}}

{{- define "coco-csi.offlineFsPath" -}}/etc/coco-csi/offline-fs/resources.json{{- end -}}

{{- define "coco-csi.cdhConfigPath" -}}/etc/coco-csi/cdh-config/cdh.toml{{- end -}}

{{/* The object-store CA bundle in the node container: a hostPath file mounted as itself, or
the ConfigMap's key in its directory. */}}
{{- define "coco-csi.objectCaDir" -}}/etc/coco-csi/object-ca{{- end -}}
{{- define "coco-csi.objectCaPath" -}}
{{- $b := .Values.node.objectCaBundle -}}
{{- printf "%s/%s" (include "coco-csi.objectCaDir" .) (ternary "ca.pem" $b.configMap.key (not (empty $b.hostPath))) -}}
{{- end -}}

{{/*
The --resolver SPEC, in the forms sealed_secrets.build_resolver understands:
  kbs:<https-url>?aa=<socket>[&ca=<path>][&cert-sha256=<hex>] | kbs:http://…&insecure-http=true
  | kbs:cdh-config:<path>?aa=<socket> | cdh:<socket> | offline-fs:<path>
The KBS must be authenticated (sealed_secrets refuses the rest at start-up too); failing here
gives the operator the reason before anything is deployed.
*/}}
{{- define "coco-csi.resolverSpec" -}}
{{- $r := .Values.resolver -}}
{{- if eq $r.kind "kbs" -}}
{{- $k := $r.kbs -}}
{{- if $k.cdhConfig -}}
{{- if or $k.url $k.caConfigMap.name $k.certSha256 $k.insecureHttp -}}
{{- fail "resolver.kbs.cdhConfig gives the KBS URL and certificate: leave resolver.kbs.url, caConfigMap.name, certSha256 and insecureHttp unset (one source of trust)" -}}
{{- end -}}
{{- printf "kbs:cdh-config:%s?aa=%s" (include "coco-csi.cdhConfigPath" .) $k.aaSocket -}}
{{- else -}}
{{- $url := required "resolver.kbs.url is required with resolver.kind=kbs: the https:// URL of your Trustee KBS (or set resolver.kbs.cdhConfig to read URL and certificate from CoCo's measured CDH config)" $k.url -}}
{{- $spec := printf "kbs:%s?aa=%s" $url $k.aaSocket -}}
{{- if hasPrefix "http://" $url -}}
{{- if not $k.insecureHttp -}}
{{- fail "resolver.kbs.url is plain http://: anything on the network path could answer as the KBS and choose the volume keys. Use https:// with resolver.kbs.caConfigMap or certSha256 (set resolver.kbs.insecureHttp=true only for tests)" -}}
{{- end -}}
{{- if or $k.caConfigMap.name $k.certSha256 -}}
{{- fail "resolver.kbs.caConfigMap and certSha256 need an https:// resolver.kbs.url" -}}
{{- end -}}
{{- $spec = printf "%s&insecure-http=true" $spec -}}
{{- else -}}
{{- if $k.insecureHttp -}}
{{- fail "resolver.kbs.insecureHttp applies only to an http:// resolver.kbs.url" -}}
{{- end -}}
{{- if not (or $k.caConfigMap.name $k.certSha256) -}}
{{- fail "resolver.kbs.caConfigMap.name (or resolver.kbs.certSha256) is required with an https:// KBS: the node plugin trusts only a pinned CA or certificate, never the system trust store" -}}
{{- end -}}
{{- if $k.caConfigMap.name -}}
{{- $spec = printf "%s&ca=%s" $spec (include "coco-csi.kbsCaPath" .) -}}
{{- end -}}
{{- if $k.certSha256 -}}
{{- $spec = printf "%s&cert-sha256=%s" $spec (lower $k.certSha256) -}}
{{- end -}}
{{- end -}}
{{- $spec -}}
{{- end -}}
{{- else if eq $r.kind "cdh" -}}
{{- printf "cdh:%s" $r.cdh.socket -}}
{{- else if eq $r.kind "offline-fs" -}}
{{- printf "offline-fs:%s" (include "coco-csi.offlineFsPath" .) -}}
{{- else -}}
{{- fail (printf "resolver.kind %q is not one of kbs, cdh, offline-fs" $r.kind) -}}
{{- end -}}
{{- end -}}

{{/*
Host directory holding the in-guest AA or CDH socket (empty for offline-fs).
*/}}
{{- define "coco-csi.guestSocketDir" -}}
{{- $r := .Values.resolver -}}
{{- if eq $r.kind "kbs" -}}
{{- include "coco-csi.socketUrlDir" $r.kbs.aaSocket -}}
{{- else if eq $r.kind "cdh" -}}
{{- include "coco-csi.socketUrlDir" $r.cdh.socket -}}
{{- end -}}
{{- end -}}

{{/* The backend volume source: backend.volume when given, else backend.hostPath. */}}
{{- define "coco-csi.backendVolume" -}}
{{- if .Values.backend.volume -}}
{{- toYaml .Values.backend.volume -}}
{{- else -}}
hostPath:
  path: {{ .Values.backend.hostPath }}
  type: DirectoryOrCreate
{{- end -}}
{{- end -}}

{{/* Chart-wide consistency checks that JSON Schema cannot express. */}}
{{- define "coco-csi.validate" -}}
{{- if and .Values.storageClass.create (not .Values.controller.enabled) -}}
{{- fail "storageClass.create=true needs controller.enabled=true: the external-provisioner in the controller is what creates volumes for the StorageClass" -}}
{{- end -}}
{{- if and .Values.storageClass.create (not (has "Persistent" .Values.csiDriver.volumeLifecycleModes)) -}}
{{- fail "storageClass.create=true needs \"Persistent\" in csiDriver.volumeLifecycleModes" -}}
{{- end -}}
{{- if and .Values.node.objectCaBundle.hostPath .Values.node.objectCaBundle.configMap.name -}}
{{- fail "node.objectCaBundle: set hostPath or configMap.name, not both (one source of trust)" -}}
{{- end -}}
{{- if and .Values.node.objectCaBundle.hostPath (not (isAbs .Values.node.objectCaBundle.hostPath)) -}}
{{- fail "node.objectCaBundle.hostPath must be an absolute path on the node" -}}
{{- end -}}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.service.enabled) -}}
{{- fail "metrics.serviceMonitor.enabled=true needs metrics.service.enabled=true: the ServiceMonitor selects that Service" -}}
{{- end -}}
{{- if and .Values.controller.enabled (gt (int .Values.controller.replicas) 1) (not .Values.backend.volume) -}}
{{- fail "controller.replicas > 1 needs a shared backend.volume (e.g. an RWX PVC): with backend.hostPath each replica would allocate volumes on its own node" -}}
{{- end -}}
{{- $ports := list .Values.node.metricsPort .Values.node.healthPort .Values.node.registrarHealthPort -}}
{{- if ne (len (uniq $ports)) 3 -}}
{{- fail "node.metricsPort, node.healthPort and node.registrarHealthPort must be different ports" -}}
{{- end -}}
{{- if .Values.controller.confidential.enabled -}}
{{- if not .Values.controller.confidential.runtimeClassName -}}
{{- fail "controller.confidential.enabled needs controller.confidential.runtimeClassName (a CoCo RuntimeClass such as kata-qemu-tdx): outside a TEE the controller must not unseal bucket credentials" -}}
{{- end -}}
{{- if not .Values.node.allowedObjectEndpoints -}}
{{- fail "controller.confidential.enabled deletes object-store volumes on node.allowedObjectEndpoints: set them (the controller takes the node's object-store flags)" -}}
{{- end -}}
{{- end -}}
{{- if eq .Values.controller.healthPort .Values.controller.provisionerHttpPort -}}
{{- fail "controller.healthPort and controller.provisionerHttpPort must be different ports" -}}
{{- end -}}
{{- end -}}

{{/* The sealed-secret and object-store policy flags (node.allowed*, node.objectCaBundle and the
opt-ins). The node plugin and a confidential controller (controller.confidential) get exactly
the same list, so the controller deletes only what the node would mount. */}}
{{- define "coco-csi.objectPolicyArgs" -}}
{{- range .Values.node.allowedSigningKids }}
- --allowed-signing-kid={{ . }}
{{- end }}
{{- range .Values.node.allowedObjectEndpoints }}
- --allowed-object-endpoint={{ . }}
{{- end }}
{{- range .Values.node.allowedObjectBuckets }}
- --allowed-object-bucket={{ . }}
{{- end }}
{{- if or .Values.node.objectCaBundle.hostPath .Values.node.objectCaBundle.configMap.name }}
- --object-ca-bundle={{ include "coco-csi.objectCaPath" . }}
{{- end }}
{{- if .Values.node.allowPlaintextObjectCredentials }}
# INSECURE (node.allowPlaintextObjectCredentials): unsealed credentials accepted.
- --allow-plaintext-object-credentials
{{- end }}
{{- if .Values.node.allowInsecureObjectEndpoint }}
# INSECURE (node.allowInsecureObjectEndpoint): http:// endpoints accepted.
- --allow-insecure-object-endpoint
{{- end }}
{{- end -}}

{{/* Mounts of what the resolver and the object-store policy read (AA/CDH socket directory,
KBS CA, CDH config, offline-fs file, object-store CA bundle): node and confidential controller. */}}
{{- define "coco-csi.resolverMounts" -}}
{{- if (include "coco-csi.guestSocketDir" .) }}
- name: guest-sockets
  mountPath: {{ (include "coco-csi.guestSocketDir" .) }}
  # Connecting to a socket works through a read-only mount.
  readOnly: true
  mountPropagation: HostToContainer
{{- end }}
{{- if and (eq .Values.resolver.kind "kbs") .Values.resolver.kbs.caConfigMap.name }}
- name: kbs-ca
  mountPath: /etc/coco-csi/kbs-ca
  readOnly: true
{{- end }}
{{- if and (eq .Values.resolver.kind "kbs") .Values.resolver.kbs.cdhConfig }}
- name: cdh-config
  mountPath: {{ include "coco-csi.cdhConfigPath" . }}
  readOnly: true
{{- end }}
{{- if eq .Values.resolver.kind "offline-fs" }}
- name: offline-fs
  mountPath: {{ include "coco-csi.offlineFsPath" . }}
  readOnly: true
{{- end }}
{{- if or .Values.node.objectCaBundle.hostPath .Values.node.objectCaBundle.configMap.name }}
- name: object-ca
  mountPath: {{ ternary (include "coco-csi.objectCaPath" .) (include "coco-csi.objectCaDir" .) (not (empty .Values.node.objectCaBundle.hostPath)) }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* The volumes behind coco-csi.resolverMounts. */}}
{{- define "coco-csi.resolverVolumes" -}}
{{- if (include "coco-csi.guestSocketDir" .) }}
- name: guest-sockets
  hostPath:
    path: {{ (include "coco-csi.guestSocketDir" .) }}
    type: DirectoryOrCreate
{{- end }}
{{- if and (eq .Values.resolver.kind "kbs") .Values.resolver.kbs.caConfigMap.name }}
- name: kbs-ca
  configMap:
    name: {{ .Values.resolver.kbs.caConfigMap.name }}
    items:
      - key: {{ .Values.resolver.kbs.caConfigMap.key }}
        path: {{ .Values.resolver.kbs.caConfigMap.key }}
{{- end }}
{{- if and (eq .Values.resolver.kind "kbs") .Values.resolver.kbs.cdhConfig }}
# CoCo's CDH config (from measured initdata): the KBS URL and certificate to trust.
- name: cdh-config
  hostPath:
    path: {{ .Values.resolver.kbs.cdhConfig }}
    type: File
{{- end }}
{{- if eq .Values.resolver.kind "offline-fs" }}
- name: offline-fs
  hostPath:
    path: {{ .Values.resolver.offlineFs.path }}
    type: File
{{- end }}
{{- with .Values.node.objectCaBundle }}
{{- if .hostPath }}
# The object-store CA bundle from the node (e.g. the measured guest image).
- name: object-ca
  hostPath:
    path: {{ .hostPath }}
    type: File
{{- else if .configMap.name }}
- name: object-ca
  configMap:
    name: {{ .configMap.name }}
    items:
      - key: {{ .configMap.key }}
        path: {{ .configMap.key }}
{{- end }}
{{- end }}
{{- end -}}
