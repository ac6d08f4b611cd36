{{/*
The probes of a cellar container, on its own HTTP listener (port "metrics"). Liveness restarts only
a process that no longer serves its CSI socket (/healthz); a broken pool or an unreachable
controller makes it unready (/readyz says why) and never restarts it. The startup probe gives the
pools up to ten minutes to open (a start-up purge of a large trash).
*/}}
{{- define "cellar.probes" -}}
startupProbe:
  httpGet:
    path: /healthz
    port: metrics
  periodSeconds: 5
  timeoutSeconds: 5
  failureThreshold: 120
livenessProbe:
  httpGet:
    path: /healthz
    port: metrics
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: /readyz
    port: metrics
  periodSeconds: 10
  timeoutSeconds: 5
{{- end -}}

{{/*
The livenessprobe sidecar, used for readiness only: its /healthz calls CSI Probe over the socket,
as kubelet and the sidecars reach the driver. It never restarts anything.
*/}}
{{- define "cellar.csiProbeSidecar" -}}
{{- $s := .root.Values.sidecars -}}
- name: liveness-probe
  image: {{ include "cellar.sidecarImage" $s.livenessProbe }}
  imagePullPolicy: {{ $s.pullPolicy }}
  args:
    - --csi-address=/csi/csi.sock
    - --http-endpoint=:{{ .port }}
  ports:
    - name: healthz
      containerPort: {{ .port }}
      protocol: TCP
  readinessProbe:
    httpGet:
      path: /healthz
      port: healthz
    periodSeconds: 10
    timeoutSeconds: 5
  securityContext:
    {{- include "cellar.sidecarSecurityContext" .root | nindent 4 }}
  resources:
    {{- toYaml $s.livenessProbe.resources | nindent 4 }}
  volumeMounts:
    - name: socket-dir
      mountPath: /csi
{{- end -}}

{{/*
The seccomp profile of a privileged cellar container. The pods run RuntimeDefault; a privileged
container (the node plugin always, the controller with shared pools) mounts, sets up loop devices
and runs mkfs, btrfs and mount helpers (FUSE ...): it already holds every capability and the host's
devices, so a syscall filter adds little there, and a runtime's default filter may refuse what
those tools call. It runs Unconfined, said explicitly rather than left to the runtime.
*/}}
{{- define "cellar.privilegedSeccomp" -}}
seccompProfile:
  type: Unconfined
{{- end -}}

{{/* A CSI sidecar's metrics port (its --http-endpoint), with metrics.enabled. */}}
{{- define "cellar.sidecarMetricsPort" -}}
{{- if .root.Values.metrics.enabled -}}
ports:
  - name: {{ .name }}
    containerPort: {{ .port }}
    protocol: TCP
{{- end -}}
{{- end -}}
