{{/* Names. */}}
{{- define "cellar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cellar.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "cellar.controllerName" -}}{{ include "cellar.fullname" . }}-controller{{- end -}}
{{- define "cellar.nodeName" -}}{{ include "cellar.fullname" . }}-node{{- end -}}

{{/* The headless Service the nodes register through, and the host name they dial. */}}
{{- define "cellar.controllerHost" -}}
{{- printf "%s.%s.svc" (include "cellar.controllerName" .) .Release.Namespace -}}
{{- end -}}

{{- define "cellar.controllerSecretName" -}}
{{- default (printf "%s-controller-tls" (include "cellar.fullname" .)) .Values.tls.controllerSecretName -}}
{{- end -}}
{{- define "cellar.nodeSecretName" -}}
{{- default (printf "%s-node-tls" (include "cellar.fullname" .)) .Values.tls.nodeSecretName -}}
{{- end -}}

{{/*
Who makes the controller's certificate and the CA the nodes check it with:
- "controller" (the default: tls.generate unset): the controller itself, from the cluster CA it
  makes on its first start (Secret <fullname>-cluster-ca) and publishes (ConfigMap
  <fullname>-cluster-ca, which the node pods mount). Nothing random is rendered.
- "cert-manager" (certManager.enabled), "helm" (tls.generate=true: genCA at render time, kept
  with lookup, NOT GitOps-stable), "secrets" (tls.generate=false: your own Secrets).
*/}}
{{- define "cellar.tlsSource" -}}
{{- if .Values.certManager.enabled -}}cert-manager
{{- else if kindIs "bool" .Values.tls.generate -}}{{ ternary "helm" "secrets" .Values.tls.generate }}
{{- else -}}
{{- if not .Values.enrolment.enabled -}}
{{- fail "enrolment.enabled=false needs a node certificate the controller does not issue: set tls.generate (true: Helm makes them, false: your own Secrets) or certManager.enabled" -}}
{{- end -}}
controller
{{- end -}}
{{- end -}}

{{/* The cluster CA's Secret, and the ConfigMap its certificate is published in (same name). */}}
{{- define "cellar.clusterCaName" -}}{{ include "cellar.fullname" . }}-cluster-ca{{- end -}}

{{/* The DNS names the controller's certificate carries: every form of the Service's name. */}}
{{- define "cellar.controllerDNSNames" -}}
{{- $svc := include "cellar.controllerName" . -}}
{{- $ns := .Release.Namespace -}}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain) | toJson -}}
{{- end -}}

{{/* The name the controller expects on every node's certificate (AGENT_SERVER_NAME in src/agent/tls.rs). */}}
{{- define "cellar.agentServerName" -}}cellar-agent{{- end -}}

{{/* Labels. */}}
{{- define "cellar.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "cellar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cellar
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "cellar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cellar.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "cellar.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "cellar.sidecarImage" -}}
{{- printf "%s:%s" .image.repository .image.tag -}}
{{- end -}}

{{/* The pool configuration file, as the driver reads it (unknown keys are errors there). */}}
{{- define "cellar.poolsYaml" -}}
{{- $c := dict "pools" .Values.config.pools -}}
{{- if .Values.config.defaultPool }}{{ $_ := set $c "defaultPool" .Values.config.defaultPool }}{{ end -}}
{{- with include "cellar.backupRepositories" . | fromJsonArray }}{{ $_ := set $c "repositories" . }}{{ end -}}
{{- toYaml $c -}}
{{- end -}}

{{/*
Backups (backups.*, docs/backups.md). Each repository's files are mounted under
/etc/cellar/backups/<name>/ in both pods: the key of passwordSecret as key/password, the
credentials of credentialsSecret as s3/credentials. The volumes are named backup-<name> (a path
repository's directory), backupkey-<name> and backups3-<name>: distinct prefixes, so no two
repositories' volumes share a name (with suffixes, offsite's key and a repository named
offsite-key would), and DNS labels of at most 63 characters (the schema keeps names to 52).
*/}}
{{- define "cellar.backupDir" -}}/etc/cellar/backups/{{ . }}{{- end -}}

{{/*
The repositories: entries of the pool file, as the driver reads them (src/backup/mod.rs): name,
path or s3 (with credentialsFile), passwordFile. Refuses what the driver would refuse at start,
at render time instead.
*/}}
{{- define "cellar.backupRepositories" -}}
{{- $out := list -}}
{{- $seen := dict -}}
{{- range .Values.backups.repositories -}}
{{- if hasKey $seen .name -}}{{- fail (printf "backups.repositories: %s is listed twice" .name) -}}{{- end -}}
{{- $_ := set $seen .name true -}}
{{- $dir := include "cellar.backupDir" .name -}}
{{- $r := dict "name" .name -}}
{{- if eq (empty .path) (empty .s3) -}}
{{- fail (printf "backups.repositories: %s needs exactly one of path and s3" .name) -}}
{{- end -}}
{{- if .path -}}
{{- if .credentialsSecret -}}{{- fail (printf "backups.repositories: %s: credentialsSecret is for s3" .name) -}}{{- end -}}
{{- $_ := set $r "path" .path -}}
{{- else -}}
{{- if .volume -}}{{- fail (printf "backups.repositories: %s: volume is for path" .name) -}}{{- end -}}
{{- $s3 := omit .s3 "credentialsFile" -}}
{{- if .credentialsSecret -}}
{{- if .s3.credentialsFile -}}{{- fail (printf "backups.repositories: %s: give credentialsSecret or s3.credentialsFile, not both" .name) -}}{{- end -}}
{{- $_ := set $s3 "credentialsFile" (printf "%s/s3/credentials" $dir) -}}
{{- else if .s3.credentialsFile -}}
{{- $_ := set $s3 "credentialsFile" .s3.credentialsFile -}}
{{- else -}}
{{- fail (printf "backups.repositories: %s: s3 needs credentialsSecret (or s3.credentialsFile)" .name) -}}
{{- end -}}
{{- $_ := set $r "s3" $s3 -}}
{{- end -}}
{{- if and .passwordSecret .passwordFile -}}
{{- fail (printf "backups.repositories: %s: give passwordSecret or passwordFile, not both" .name) -}}
{{- else if .passwordSecret -}}
{{- $_ := set $r "passwordFile" (printf "%s/key/password" $dir) -}}
{{- else if .passwordFile -}}
{{- $_ := set $r "passwordFile" .passwordFile -}}
{{- else -}}
{{- fail (printf "backups.repositories: %s needs passwordSecret (or passwordFile)" .name) -}}
{{- end -}}
{{- $out = append $out $r -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* The backup mounts of the cellar container, the same in the controller and the node pods. */}}
{{- define "cellar.backupVolumeMounts" -}}
{{- range .Values.backups.repositories }}
{{- $dir := include "cellar.backupDir" .name }}
{{- if .path }}
- name: backup-{{ .name }}
  mountPath: {{ .path }}
  {{- if or (not .volume) (hasKey .volume "hostPath") }}
  mountPropagation: HostToContainer
  {{- end }}
{{- end }}
{{- if .passwordSecret }}
- name: backupkey-{{ .name }}
  mountPath: {{ $dir }}/key
  readOnly: true
{{- end }}
{{- if .credentialsSecret }}
- name: backups3-{{ .name }}
  mountPath: {{ $dir }}/s3
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{/*
Their volumes: a path repository's `volume` (any pod volume source), else the host's directory at
its path, which must exist (a filesystem every node mounts there: a missing mount fails the pod
rather than backing up onto the root disk); the Secrets, read-only, one key each.
*/}}
{{- define "cellar.backupVolumes" -}}
{{- range .Values.backups.repositories }}
{{- if .path }}
- name: backup-{{ .name }}
  {{- if .volume }}
  {{- toYaml .volume | nindent 2 }}
  {{- else }}
  hostPath:
    path: {{ .path }}
    type: Directory
  {{- end }}
{{- end }}
{{- if .passwordSecret }}
- name: backupkey-{{ .name }}
  secret:
    secretName: {{ .passwordSecret.name }}
    defaultMode: 0400
    items:
      - key: {{ .passwordSecret.key | default "password" }}
        path: password
{{- end }}
{{- if .credentialsSecret }}
- name: backups3-{{ .name }}
  secret:
    secretName: {{ .credentialsSecret }}
    defaultMode: 0400
    items:
      - key: credentials
        path: credentials
{{- end }}
{{- end }}
{{- end -}}

{{/* --backup-bandwidth of the nodes: empty when there is no limit (0, the flag's default). */}}
{{- define "cellar.backupBandwidth" -}}
{{- $bw := .Values.backups.bandwidth -}}
{{- $s := ternary $bw (toString ($bw | default 0 | int64)) (kindIs "string" $bw) -}}
{{- if not (has $s (list "" "0")) }}{{ $s }}{{ end -}}
{{- end -}}

{{/*
"true" when a shared pool is configured: the controller serves shared pools itself, mounting those
with a source and creating, chowning and copying volume directories on all of them.
*/}}
{{- define "cellar.hasSharedPools" -}}
{{- $m := false -}}
{{- range .Values.config.pools -}}
{{- if eq (default "local" .backend) "shared" -}}{{- $m = true -}}{{- end -}}
{{- end -}}
{{- $m -}}
{{- end -}}

{{/*
Host paths of the pools that the containers must see at the same path: every explicit pool path
outside dataDir (mounted on its own), as a list of {name, path, type}. Local pools and shared pools
already mounted on the host must exist (type Directory: a missing disk fails the pod instead of
filling the root disk); a shared pool that cellar mounts at its path may be created.
`shared` limits the list to shared pools (what the controller needs).
*/}}
{{- define "cellar.poolHostPaths" -}}
{{- $root := .root -}}
{{- $data := trimSuffix "/" $root.Values.dataDir -}}
{{- $seen := dict -}}
{{- $out := list -}}
{{- range $root.Values.config.pools -}}
{{- $shared := eq (default "local" .backend) "shared" -}}
{{- if and .path (or $shared (not $.sharedOnly)) -}}
{{- $p := trimSuffix "/" .path -}}
{{- $kubelet := trimSuffix "/" $root.Values.kubeletDir -}}
{{- /* A pool inside the kubelet dir is mounted inside its Bidirectional mount with other propagation:
publish mounts made there would not reach the host. One holding the kubelet dir would show the pods'
volumes to the pool. */ -}}
{{- if or (eq $p $kubelet) (hasPrefix (printf "%s/" $kubelet) $p) (hasPrefix (printf "%s/" $p) $kubelet) -}}
{{- fail (printf "config.pools: pool %s's path %s overlaps kubeletDir %s; put pools outside the kubelet's directory" .name .path $root.Values.kubeletDir) -}}
{{- end -}}
{{- if not (or (eq $p $data) (hasPrefix (printf "%s/" $data) $p) (hasKey $seen $p)) -}}
{{- $_ := set $seen $p true -}}
{{- $type := ternary "DirectoryOrCreate" "Directory" (and $shared (not (empty .source))) -}}
{{- /* The index keeps two long names that share their first 63 characters apart. */ -}}
{{- $out = append $out (dict "name" (printf "pool-%d-%s" (len $out) .name | trunc 63 | trimSuffix "-") "path" $p "type" $type) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/*
The mutual-TLS material generated by Helm (tls.generate without cert-manager), base64-encoded:
the Secrets already in the cluster when both exist and share a CA (upgrades keep them), else a
new CA with both certificates. Computed once per render and kept in .Values, so the Secrets and
the pods' checksum annotations see the same certificates.
*/}}
{{- define "cellar.tlsMaterial" -}}
{{- if not (hasKey .Values "__cellarTlsMaterial") -}}
{{- $ns := .Release.Namespace -}}
{{- $ctrl := lookup "v1" "Secret" $ns (include "cellar.controllerSecretName" .) -}}
{{- $node := lookup "v1" "Secret" $ns (include "cellar.nodeSecretName" .) -}}
{{- $m := dict -}}
{{- $complete := and $ctrl $node $ctrl.data $node.data (index $ctrl.data "ca.crt") (index $node.data "ca.crt") (index $ctrl.data "tls.key") (index $node.data "tls.key") -}}
{{- if and $complete (eq (index $ctrl.data "ca.crt") (index $node.data "ca.crt")) -}}
{{- $m = dict "ca" (index $ctrl.data "ca.crt") "controllerCert" (index $ctrl.data "tls.crt") "controllerKey" (index $ctrl.data "tls.key") "nodeCert" (index $node.data "tls.crt") "nodeKey" (index $node.data "tls.key") -}}
{{- else -}}
{{- $days := int .Values.tls.validityDays -}}
{{- $ca := genCA (printf "%s-ca" (include "cellar.fullname" .)) $days -}}
{{- $c := genSignedCert (include "cellar.controllerHost" .) nil (include "cellar.controllerDNSNames" . | fromJsonArray) $days $ca -}}
{{- $n := genSignedCert (include "cellar.agentServerName" .) nil (list (include "cellar.agentServerName" .)) $days $ca -}}
{{- $m = dict "ca" ($ca.Cert | b64enc) "controllerCert" ($c.Cert | b64enc) "controllerKey" ($c.Key | b64enc) "nodeCert" ($n.Cert | b64enc) "nodeKey" ($n.Key | b64enc) -}}
{{- end -}}
{{- $_ := set .Values "__cellarTlsMaterial" $m -}}
{{- end -}}
{{- toJson .Values.__cellarTlsMaterial -}}
{{- end -}}

{{/* Pod annotations that restart the pods when their configuration or certificates change. */}}
{{- define "cellar.checksums" -}}
checksum/config: {{ include "cellar.poolsYaml" . | sha256sum }}
{{- if eq (include "cellar.tlsSource" .) "helm" }}
checksum/tls: {{ include "cellar.tlsMaterial" . | sha256sum }}
{{- end }}
{{- end -}}

{{- define "cellar.metricsAnnotations" -}}
{{- if and .root.Values.metrics.enabled .root.Values.metrics.podAnnotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end -}}
{{- end -}}

{{/* The TLS flags of both roles; the Secret is mounted at /etc/cellar/tls. */}}
{{- define "cellar.tlsArgs" -}}
- --tls-ca=/etc/cellar/tls/ca.crt
- --tls-cert=/etc/cellar/tls/tls.crt
- --tls-key=/etc/cellar/tls/tls.key
{{- end -}}

{{/* The controller's TLS flags: its own certificate from the cluster CA, or the Secret's files. */}}
{{- define "cellar.controllerTlsArgs" -}}
{{- if eq (include "cellar.tlsSource" .) "controller" -}}
# Its own certificate from the cluster CA it keeps, published for the nodes (no Secret to mount).
- --cluster-ca-secret={{ .Release.Namespace }}/{{ include "cellar.clusterCaName" . }}
- --cluster-ca-publish={{ .Release.Namespace }}/{{ include "cellar.clusterCaName" . }}
{{- range include "cellar.controllerDNSNames" . | fromJsonArray }}
- --controller-name={{ . }}
{{- end }}
- --controller-certificate-validity={{ include "cellar.validity" (list "tls.controllerCertificateValidity" .Values.tls.controllerCertificateValidity) }}
{{- else -}}
{{- include "cellar.tlsArgs" . }}
{{- end -}}
{{- end -}}

{{/* The Secret in which the controller keeps the CA it signs node certificates with (enrolment). */}}
{{- define "cellar.enrolmentSecretName" -}}{{ include "cellar.fullname" . }}-enrolment-ca{{- end -}}

{{/* The audience of the nodes' projected tokens: only cellar's controller accepts them. */}}
{{- define "cellar.enrolmentAudience" -}}cellar{{- end -}}

{{/* Where the node plugin finds its projected token and keeps its enrolled certificate. */}}
{{- define "cellar.enrolmentTokenDir" -}}/var/run/secrets/cellar{{- end -}}
{{- define "cellar.enrolmentDir" -}}/run/cellar/identity{{- end -}}

{{/* Whether the controller refuses the nodes' shared certificate. */}}
{{- define "cellar.requireNodeCertificates" -}}
{{- or .Values.controller.requireNodeCertificates (and .Values.enrolment.enabled .Values.enrolment.requireNodeCertificates) -}}
{{- end -}}

{{- define "cellar.sidecarSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* Changed block tracking (snapshotMetadata): the sidecar's Service, host and TLS Secret. */}}
{{- define "cellar.snapshotMetadataName" -}}{{ include "cellar.fullname" . }}-snapshot-metadata{{- end -}}
{{- define "cellar.snapshotMetadataHost" -}}
{{- printf "%s.%s.svc" (include "cellar.snapshotMetadataName" .) .Release.Namespace -}}
{{- end -}}
{{- define "cellar.snapshotMetadataSecretName" -}}
{{- default (printf "%s-tls" (include "cellar.snapshotMetadataName" .)) .Values.snapshotMetadata.tls.secretName -}}
{{- end -}}

{{/*
The sidecar's certificate when the chart makes it: self-signed for the Service's names (so it is
its own CA in the SnapshotMetadataService object), made at install and found again (lookup) at
every upgrade, like cellar.tlsMaterial. Values: base64 "cert" and "key".
*/}}
{{- define "cellar.snapshotMetadataTls" -}}
{{- if not (hasKey .Values "__cellarSnapshotMetadataTls") -}}
{{- $old := lookup "v1" "Secret" .Release.Namespace (include "cellar.snapshotMetadataSecretName" .) -}}
{{- $m := dict -}}
{{- if and $old $old.data (index $old.data "tls.crt") (index $old.data "tls.key") -}}
{{- $m = dict "cert" (index $old.data "tls.crt") "key" (index $old.data "tls.key") -}}
{{- else -}}
{{- $svc := include "cellar.snapshotMetadataName" . -}}
{{- $ns := .Release.Namespace -}}
{{- $names := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain) -}}
{{- $c := genSelfSignedCert (include "cellar.snapshotMetadataHost" .) nil $names (int .Values.tls.validityDays) -}}
{{- $m = dict "cert" ($c.Cert | b64enc) "key" ($c.Key | b64enc) -}}
{{- end -}}
{{- $_ := set .Values "__cellarSnapshotMetadataTls" $m -}}
{{- end -}}
{{- toJson .Values.__cellarSnapshotMetadataTls -}}
{{- end -}}

{{/*
A certificate validity the controller accepts (10s to 366 days; the schema has checked its form:
digits and ms, s, m or h, none meaning seconds), else the render fails instead of the controller
failing at start. Call with (list "the value's name" value); renders the value.
*/}}
{{- define "cellar.validity" -}}
{{- $name := index . 0 -}}
{{- $v := toString (index . 1) -}}
{{- $n := regexFind "^[0-9]+" $v | atoi -}}
{{- $unit := trimPrefix (regexFind "^[0-9]+" $v) $v -}}
{{- $ms := mul $n (get (dict "ms" 1 "s" 1000 "" 1000 "m" 60000 "h" 3600000) $unit) -}}
{{- if or (lt $ms 10000) (gt $ms 31622400000) -}}
{{- fail (printf "%s=%s: a certificate validity must be between 10s and 366 days (8784h)" $name $v) -}}
{{- end -}}
{{- $v -}}
{{- end -}}

{{/*
A class parameter as the string the API takes. YAML numbers reach a template as float64, which
toString writes in exponent form past 6 digits (uid 1000680000 became "1.00068e+09", refused by
the driver): a whole number is written as one.
*/}}
{{- define "cellar.parameter" -}}
{{- if and (kindIs "float64" .) (eq (. | int64 | float64) .) -}}
{{- . | int64 | toString | quote -}}
{{- else -}}
{{- . | toString | quote -}}
{{- end -}}
{{- end -}}
