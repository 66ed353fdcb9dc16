// The dashboard's only script: an opt-in auto-refresh, remembered per browser.
(function () {
  "use strict";
  var box = document.getElementById("auto-refresh");
  if (!box) { return; }
  var key = "saga-dashboard-auto-refresh";
  var timer = null;
  function schedule() {
    if (timer) { clearTimeout(timer); timer = null; }
    if (box.checked) { timer = setTimeout(function () { location.reload(); }, 10000); }
  }
  try { box.checked = localStorage.getItem(key) === "on"; } catch (e) { /* storage may be off */ }
  box.addEventListener("change", function () {
    try { localStorage.setItem(key, box.checked ? "on" : "off"); } catch (e) { /* ignore */ }
    schedule();
  });
  schedule();
}());
